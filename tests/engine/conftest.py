"""Engine tests: one vLLM CPU engine at a time, shared by the tests of a module, its engine core
in the pytest process (engine_checks.start_engine; TP/PP 2 workers are still spawned).

Environment for every engine started here (set before vLLM is imported):
  VLLM_CPU_KVCACHE_SPACE=1               1 GiB of KV cache is plenty for tiny models
  VLLM_WORKER_MULTIPROC_METHOD=spawn     workers never inherit this process's threads
  VLLM_ALLOW_INSECURE_SERIALIZATION=1    lets LLM.apply_model ship our inspection function
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

# The helper module sits beside the tests (test folders are not packages).
sys.path.insert(0, str(Path(__file__).parent))
