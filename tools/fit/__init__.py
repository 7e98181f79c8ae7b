"""`unipool-steering fit`: a steering profile fitted from labelled examples (MASCing's pipeline).

data.py (labelled JSONL, splits), sources.py and server.py (router logits from the reference
model or a running server), surrogate.py (the LSTM classifier of routing traces),
optimise.py (S against the frozen surrogate, alpha), judge.py (end-to-end judges),
report.py (evaluation table), pipeline.py (the whole run), command.py (the CLI).
"""
