"""unipool-steering fit: data, judges, surrogate, S and expert selection on a signal that is there by
design, the CLI.

The signal: every label-1 example contains a marker whose routing differs, by construction
(synthetic traces with a spiked expert, or a tiny model whose layer-0 router sends the
marker token's logits to expert 3); the risk-difference tests build traces whose selection
rates are known exactly. Nothing here depends on what an untrained model emits.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from transformers import MixtralConfig

from unipool_serve.demo.tiny_model import tiny_config, write_tiny_model
from unipool_serve.tools.steering_cli import main as steering_cli
from unipool_serve.tools.fit import expert_selection, optimise, report, surrogate
from unipool_serve.tools.fit.data import Example, FitDataError, read_examples, split
from unipool_serve.tools.fit.judge import JudgeError, parse_judge
from unipool_serve.tools.fit.pipeline import FitError, FitOptions, run_fit
from unipool_serve.model_executor.steering.profile import SteeringProfile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L, E, SPIKE = 4, 8, 3  # layers, experts, the expert label-1 tokens are routed to


# ---- synthetic traces and a source made of them ---------------------------------
def trace(text: str) -> torch.Tensor:
    """[T, L, E] logits, a function of each word (as a router's are of its token); the marker
    word '@' spikes expert SPIKE in layer 1."""
    rows = []
    for word in text.split():
        row = torch.randn(L, E, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))
        if word == "@":
            row[1, SPIKE] += 6.0
        rows.append(row)
    return torch.stack(rows)


class SyntheticSource:
    """Logits from `trace`; a label-1 continuation is 'code' until the profile pulls the marker's
    expert down (alpha * S[1, SPIKE] <= -1) and/or excludes it in layer 1, as `flips_on` says."""

    description = "synthetic"

    def __init__(self, flips_on: str = "bias"):
        assert flips_on in ("bias", "exclusion", "both")
        self.flips_on = flips_on

    def capture(self, examples, progress=True):
        return [trace(e.prompt) for e in examples]

    def suppressed(self, profile) -> bool:
        if profile is None:
            return False
        pulled = float(profile.bias_rows()[1, SPIKE]) <= -1.0
        excluded = SPIKE in profile.exclude.get(1, [])
        return {"bias": pulled, "exclusion": excluded, "both": pulled and excluded}[self.flips_on]

    def generate(self, examples, profile, max_new_tokens, progress=True):
        flipped = self.suppressed(profile)
        return ["code" if "@" in e.prompt.split() and not flipped else "prose" for e in examples]


def labelled(n_per_label: int) -> list[Example]:
    words = "river stone road tree lamp door field hill".split()
    out = []
    for i in range(n_per_label):
        base = [words[(i * 3 + j) % len(words)] for j in range(5 + i % 4)]
        out.append(Example(label=1, prompt=" ".join(base[:2] + ["@"] + base[2:] + ["@"]), line=2 * i + 1))
        out.append(Example(label=0, prompt=" ".join(base), line=2 * i + 2))
    return out


def test_surrogate_learns_the_signal_and_s_suppresses_it():
    examples = labelled(30)
    parts = split(examples, seed=0)
    traces = {name: [trace(e.prompt) for e in getattr(parts, name)] for name in ("train", "test")}
    labels = {name: [e.label for e in getattr(parts, name)] for name in ("train", "test")}
    model = surrogate.train_surrogate(traces["train"], labels["train"], seed=0, progress=False)
    assert surrogate.accuracy(model, traces["test"], labels["test"]) >= 0.9
    ones = [t for t, y in zip(traces["train"], labels["train"]) if y == 1]
    bias = optimise.sparsify(optimise.fit_bias(model, ones, l1=1e-3, seed=0, epochs=60, progress=False), 0.1)
    assert bias[1, SPIKE] < 0  # the spiked expert is pushed down
    test_ones = [t for t, y in zip(traces["test"], labels["test"]) if y == 1]
    before = surrogate.probabilities(model, test_ones).mean()
    after = surrogate.probabilities(model, test_ones, bias).mean()
    assert before > 0.8 and after < 0.2, (before, after)


def test_steering_in_the_surrogate_is_the_engines_rule():
    from unipool_serve.kernels.routing_reference import steer_logits

    x, bias = torch.randn(2, 3, L, E), torch.randn(L, E)
    steered = surrogate.steer_traces(x, bias)
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(steered[b, t], steer_logits(x[b, t], bias))  # row l: z + std(z_l) * S[l]


def _options(**kw):
    return FitOptions(**{"name": "calm", "lambdas": (1e-3,), "alphas": (0.5, 1.0, 2.0), "surrogate_epochs": 60,
                         "bias_epochs": 100, "progress": False, **kw})


def test_fit_is_deterministic_for_a_seed_and_records_how_it_was_made():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    runs = [run_fit(SyntheticSource(), config, labelled(20), "f" * 64, _options(seed=s)) for s in (5, 5, 6)]
    a, b, c = (r.profile for r in runs)
    assert torch.equal(a.bias, b.bias) and a.alpha == b.alpha and a.exclude == b.exclude
    drop = lambda p: {k: v for k, v in p.provenance.items() if k != "created"}  # noqa: E731
    assert drop(a) == drop(b)
    assert drop(a) != drop(c)  # another seed, another split
    made = a.provenance
    assert made["data_sha256"] == "f" * 64
    if made["kind"] == "exclusions only":  # the surrogate sees the marker's expert excluded as enough
        assert made["lambda"] is None and made["alpha"] is None and SPIKE in a.exclude[1]
    else:
        assert made["lambda"] == 1e-3 and made["alpha"] == a.alpha
    assert made["surrogate"]["accuracy"]["test"] >= 0.9 and made["alpha_chosen_by"] == "surrogate"
    assert made["splits"] == {"train": 24, "val": 8, "test": 8} and made["created"]
    rows = {r.steering.split(" (")[0]: r for r in runs[0].rows}
    assert rows["unsteered"].surrogate_1 >= 0.9 and rows["fitted"].surrogate_1 <= 0.1
    assert [r.steering for r in runs[0].rows][2:] == [f"random control, seed {s}" for s in report.RANDOM_SEEDS]


def test_a_judge_chooses_alpha_by_generation():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    result = run_fit(SyntheticSource(), config, labelled(20), "0" * 64,
                     _options(judge=parse_judge("regex:^code$"), alphas=(0.05, 0.5, 4.0)))
    made = result.profile.provenance
    assert made["alpha_chosen_by"] == "regex:^code$"
    # SyntheticSource's continuations flip once alpha * S[1, SPIKE] <= -1: the smallest such alpha wins
    flips = [c for c in result.candidates if c.judge_rate == 0.0]
    assert flips and result.profile.alpha == min(c.alpha for c in flips)
    fitted = result.rows[1]
    assert result.rows[0].judge_1 == 1.0 and fitted.judge_1 == 0.0 and fitted.judge_0 == 0.0
    assert "judge, label 1" in result.table()


def test_random_controls_keep_each_layers_values_and_exclusions():
    bias, mask = torch.zeros(L, E), torch.zeros(L, E, dtype=torch.int8)
    bias[1, 2], bias[1, 5], bias[3, 0] = -1.5, 0.7, 2.0
    mask[1, 2], mask[1, 6], mask[2, 4] = -1, -1, -1
    for seed in report.RANDOM_SEEDS:
        control, control_mask = report.random_like(bias, mask, seed)
        for layer in range(L):
            assert sorted(control[layer].tolist()) == sorted(bias[layer].tolist())
            assert sorted(control_mask[layer].tolist()) == sorted(mask[layer].tolist())
        # one permutation per layer: the expert given -1.5 in layer 1 is also excluded, as expert 2 was
        assert control_mask[1, control[1] == -1.5].tolist() == [-1]
    assert not all(torch.equal(report.random_like(bias, mask, s)[1], mask) for s in report.RANDOM_SEEDS)
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    fitted = SteeringProfile.for_config(config, name="calm", bias=bias, alpha=2.0, exclude={1: [2, 6], 2: [4]})
    for _, control in report.random_controls(fitted):
        assert control.alpha == 2.0 and {k: len(v) for k, v in control.exclude.items()} == {1: 2, 2: 1}


# ---- SteerMoE expert selection ----------------------------------------------------
def one_hot_trace(picks: list[list[int]]) -> torch.Tensor:
    """[T, L, E] logits whose top-1 in layer l of token t is picks[t][l] (the rest noise below it)."""
    x = torch.rand(len(picks), L, E, generator=torch.Generator().manual_seed(len(picks)))
    for t, row in enumerate(picks):
        for layer, expert in enumerate(row):
            x[t, layer, expert] = 5.0
    return x


def test_risk_difference_is_the_difference_of_the_labels_selection_rates():
    # label 1: 4 tokens; layer 0 picks expert 2 three times and expert 0 once; label 0: 5 tokens, all expert 0
    ones = [one_hot_trace([[2, 1, 1, 1], [2, 1, 1, 1]]), one_hot_trace([[2, 1, 1, 1], [0, 1, 1, 1]])]
    zeros = [one_hot_trace([[0, 1, 1, 1]] * 3), one_hot_trace([[0, 1, 1, 1]] * 2)]
    rd = expert_selection.risk_difference(ones, zeros, top_k=1)
    want = torch.zeros(L, E)
    want[0, 2], want[0, 0] = 0.75, 0.25 - 1.0
    torch.testing.assert_close(rd, want)
    rates = expert_selection.selection_rates(ones, top_k=2)  # top-2: every token picks two experts
    torch.testing.assert_close(rates.sum(dim=1), torch.full((L,), 2.0))


def test_expert_mask_takes_the_largest_risk_differences_under_the_cap():
    rd = torch.zeros(L, E)
    rd[0, 3], rd[0, 5], rd[0, 1], rd[0, 6] = 0.6, 0.3, 0.04, -0.5
    rd[2, 7] = 0.2
    mask = expert_selection.expert_mask(rd, exclude_cap=2, top_k=1, min_rd=0.05)
    assert expert_selection.mask_sets(mask) == ({}, {0: [3, 5], 2: [7]})
    one = expert_selection.expert_mask(rd, exclude_cap=1, top_k=1, min_rd=0.05)
    assert expert_selection.mask_sets(one) == ({}, {0: [3], 2: [7]})
    # below min_rd never, however high the cap; includes: the most negative, at most top_k
    wide = expert_selection.expert_mask(rd, exclude_cap=E, top_k=1, min_rd=0.05, include_cap=3)
    assert expert_selection.mask_sets(wide) == ({0: [6]}, {0: [3, 5], 2: [7]})
    everything = expert_selection.expert_mask(torch.ones(L, E), exclude_cap=E, top_k=2, min_rd=0.05)
    assert ((everything == -1).sum(dim=1) == E - 2).all()  # top_k experts always remain


def test_the_surrogates_view_of_masks():
    x = torch.tensor([[[[1.0, 4.0, -2.0, 0.5]]], [[[0.0, 0.0, 0.0, 0.0]]]])  # [B=2, T=1, L=1, E=4], second padding
    mask = torch.tensor([[-1, 0, 0, 1]], dtype=torch.int8)
    steered = surrogate.steer_traces(x, None, mask)
    assert steered[0, 0, 0].tolist() == [-2.0, 4.0, -2.0, 4.0]  # excluded to the row's floor, included to the ceiling
    assert not steered[1].any()  # padding stays zero
    bias = torch.tensor([[0.0, -1.0, 0.0, 0.0]])
    both = surrogate.steer_traces(x, bias, mask)[0, 0, 0]
    assert both[1] < 4.0 and both[3] == both[1]  # the bias applies first, the ceiling follows it


def test_the_judge_chooses_bias_exclusions_or_both_as_the_behaviour_needs():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    chosen = {}
    for needs in ("bias", "exclusion", "both"):
        result = run_fit(SyntheticSource(flips_on=needs), config, labelled(20), "0" * 64,
                         _options(judge=parse_judge("regex:^code$"), alphas=(0.05, 4.0), exclude_caps=(1, 2)))
        made = result.profile.provenance
        assert {c["kind"] for c in made["candidates"]} == {"bias only", "exclusions only", "bias + exclusions"}
        rd = torch.tensor(made["selection"]["risk_difference"])
        assert int(rd[1].argmax()) == SPIKE and rd[1, SPIKE] > 0.1  # the marker's expert, from the captures
        assert result.rows[1].judge_1 == 0.0, result.table()
        chosen[needs] = made["kind"]
        if needs != "bias":
            assert SPIKE in result.profile.exclude[1]
    assert chosen == {"bias": "bias only", "exclusion": "exclusions only", "both": "bias + exclusions"}


def test_exclude_cap_zero_fits_a_bias_only():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    result = run_fit(SyntheticSource(), config, labelled(10), "0" * 64, _options(exclude_caps=(0,)))
    assert {c.kind for c in result.candidates} == {"bias only"} and not result.profile.exclude


def test_exclusions_remain_candidates_when_every_s_is_zero():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    result = run_fit(SyntheticSource(flips_on="exclusion"), config, labelled(10), "0" * 64,
                     _options(lambdas=(10.0,), judge=parse_judge("regex:^code$"),  # an L1 that zeroes S
                              risk_difference_bias=False))
    assert {c.kind for c in result.candidates} == {"exclusions only"}
    assert SPIKE in result.profile.exclude[1] and result.rows[1].judge_1 == 0.0
    with pytest.raises(FitError, match="every fitted S is zero"):
        run_fit(SyntheticSource(), config, labelled(10), "0" * 64,
                _options(lambdas=(10.0,), exclude_caps=(0,), risk_difference_bias=False))


def test_the_risk_difference_bias_is_scaled_per_layer_and_sparsified():
    rd = torch.tensor([[0.4, -0.2, 0.03, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.1, 0.05, 0.005, 0.02]])
    bias = expert_selection.risk_difference_bias(rd, threshold=0.1)
    assert torch.allclose(bias, torch.tensor([[-1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.0, -0.2]]))
    assert expert_selection.risk_difference_bias(torch.zeros(2, 4), threshold=0.1) is None


def test_the_judge_takes_the_risk_difference_bias_when_the_fitted_s_is_gone():
    config = tiny_config(num_hidden_layers=L, num_experts=E)
    result = run_fit(SyntheticSource(flips_on="bias"), config, labelled(20), "0" * 64,
                     _options(lambdas=(10.0,), exclude_caps=(0,), alphas=(0.05, 4.0),  # S zeroed, no exclusions
                              judge=parse_judge("regex:^code$"), risk_difference_bias=True))
    made = result.profile.provenance
    assert {c.bias_source for c in result.candidates} == {"risk difference"}
    assert (made["kind"], made["bias"], made["lambda"], made["alpha"]) == ("bias only", "risk difference", None, 4.0)
    assert float(result.profile.bias_rows()[1, SPIKE]) == pytest.approx(-4.0)  # the marker's expert: rd's largest
    assert result.rows[1].judge_1 == 0.0 and "risk-difference bias, alpha 4" in result.rows[1].steering
    assert "| risk difference |" in result.candidates_table()


def test_judge_data_is_where_the_judge_chooses_and_data_keeps_no_validation_part():
    class Recording(SyntheticSource):
        judged: list = []

        def generate(self, examples, profile, max_new_tokens, progress=True):
            self.judged.append([e.prompt for e in examples])
            return super().generate(examples, profile, max_new_tokens, progress)

    config = tiny_config(num_hidden_layers=L, num_experts=E)
    judge_examples = [Example(label=e.label, prompt="lamp " + e.prompt, line=e.line) for e in labelled(4)]
    source = Recording()
    result = run_fit(source, config, labelled(20), "0" * 64,
                     _options(judge=parse_judge("regex:^code$"), alphas=(0.05, 4.0), judge_examples=judge_examples,
                              judge_data_hash="a" * 64))
    made = result.profile.provenance
    assert made["splits"] == {"train": 32, "val": 8, "test": 8} and made["judge_data_sha256"] == "a" * 64
    candidates = len(result.candidates)
    chose, tested = source.judged[:1 + 2 * candidates], source.judged[1 + 2 * candidates:]
    assert all(p.startswith("lamp ") for batch in chose for p in batch)  # every choice on the judge's examples
    assert tested and not any(p.startswith("lamp ") for batch in tested for p in batch)  # the table on --data's test
    assert result.rows[1].judge_1 == 0.0


# ---- data and judges ------------------------------------------------------------
@pytest.mark.parametrize("lines, message", [
    ([], "no examples"),
    (['{"prompt": "a", "label": 1}'] * 4, "all 4 examples have label 1"),
    (['{"prompt": "a", "label": 1}', "{not json"], "data.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "label": 2}'], "data.jsonl:1: \"label\" must be 1"),
    (['{"prompt": "a", "label": true}'], "\"label\" must be 1"),
    (['{"prompt": "a", "messages": [], "label": 1}'], "exactly one of"),
    (['{"messages": [{"role": "system", "content": "x"}], "label": 0}'], "no user message"),
    (['{"prompt": "", "label": 0}'], "non-empty string"),
    (['{"prompt": "a", "label": 1}'] * 3 + ['{"prompt": "b", "label": 0}'] * 2, "label 0 has 2 example(s)"),
])
def test_bad_data_is_refused_naming_the_line(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FitDataError) as err:
        read_examples(path)
    assert message in str(err.value)


def test_split_is_stratified_and_seeded():
    examples = labelled(10)
    parts = split(examples, seed=3)
    assert parts.sizes() == {"train": 12, "val": 4, "test": 4}
    for part in (parts.train, parts.val, parts.test):
        assert {e.label for e in part} == {0, 1}
    assert split(examples, seed=3) == parts and split(examples, seed=4) != parts
    no_val = split(examples, seed=3, validation=False)  # the judge has examples of its own (--judge-data)
    assert no_val.sizes() == {"train": 16, "val": 0, "test": 4} and {e.label for e in no_val.test} == {0, 1}


def test_judges():
    assert parse_judge("regex:\\bdef\\b").shows("def f():") and not parse_judge("regex:\\bdef\\b").shows("undefined")
    assert parse_judge("keywords:Bomb, poison").rate(["a BOMB", "fine", "poisonous"]) == pytest.approx(2 / 3)
    refusal = parse_judge("not:keywords:I can't,I cannot")
    assert refusal.shows("Sure, here is how") and not refusal.shows("Sorry, I cannot help with that.")
    classify = parse_judge("callable:unipool_serve.demo.classifier:classify=code")
    assert classify.shows("x = f(y)\nreturn x[0]") and not classify.shows("The river was quiet.")
    for bad, message in [("regex:(", "invalid regular expression"), ("nope:x", "unknown kind"),
                         ("callable:no.such.module:f", "cannot import"), ("regex", "expected")]:
        with pytest.raises(JudgeError, match=message):
            parse_judge(bad)


# ---- the CLI, on a tiny model whose layer-0 router sees the marker by design ----------
@pytest.fixture(scope="module")
def crafted_model(tmp_path_factory):
    """A tiny model whose layer-0 router gives the '@' token a large logit on expert 3."""
    from transformers import AutoTokenizer

    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    folder = write_tiny_model(tmp_path_factory.mktemp("crafted"), seed=0)
    model = UniPoolForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    marker = AutoTokenizer.from_pretrained(str(folder))("@", add_special_tokens=False)["input_ids"]
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size,
                                                          generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[marker] = 3.0 * direction  # dominates the residual stream there
        model.model.routers[0].weight[3] += 2.0 * direction
    model.save_pretrained(str(folder))
    return folder


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"prompt": e.prompt, "label": e.label}) + "\n" for e in examples))
    return path


def test_cli_fits_a_profile_on_the_crafted_model(crafted_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", labelled(15))
    out = tmp_path / "calm.safetensors"
    argv = ["fit", "--model", str(crafted_model), "--data", str(data), "--name", "calm", "--out", str(out),
            "--lambda", "1e-3", "--alpha", "0.5", "1", "2", "--surrogate-epochs", "20", "--bias-epochs", "40",
            "--threads", "1", "--no-progress"]
    assert steering_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "| unsteered" in printed and "random control, seed 2" in printed and f"wrote {out}" in printed
    chosen_rows = [line for line in printed.splitlines() if line.startswith("| * ")]
    assert len(chosen_rows) == 1 and "| bias only " in printed and "| exclusions only " in printed
    profile = SteeringProfile.load(out)
    made = profile.provenance
    assert made["surrogate"]["accuracy"]["test"] >= 0.9, made
    rows = {r["steering"].split(" (")[0]: r for r in made["evaluation"]}
    assert rows["unsteered"]["surrogate_1"] >= 0.9 and rows["fitted"]["surrogate_1"] <= 0.5, rows
    rd = torch.tensor(made["selection"]["risk_difference"])
    assert int(rd[0].argmax()) == 3, rd[0]  # the marker's expert is the one label 1 selects more
    # whichever kind the surrogate chose, the marker's expert is pushed down or excluded
    assert profile.bias[0, 3] < 0 or 3 in profile.exclude.get(0, []), made["kind"]


def _cli_error(capsys, argv) -> str:
    assert steering_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("unipool-steering fit: error: ")
    return err


def test_cli_errors_are_one_line(tiny_model_factory, tmp_path, capsys):
    folder = tiny_model_factory("fit-cli")
    capsys.readouterr()  # writing the folder prints progress bars
    base = ["fit", "--model", str(folder), "--name", "calm", "--out", str(tmp_path / "o.safetensors"), "--no-progress"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "label": 1}\n\n{"prompt": "b" "label": 0}\n')
    assert "bad.jsonl:3: not valid JSON" in _cli_error(capsys, base + ["--data", str(bad)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no examples" in _cli_error(capsys, base + ["--data", str(empty)])
    one = write_jsonl(tmp_path / "one.jsonl", [e for e in labelled(5) if e.label == 1])
    assert "all 5 examples have label 1" in _cli_error(capsys, base + ["--data", str(one)])
    good = write_jsonl(tmp_path / "good.jsonl", labelled(5))
    other = SteeringProfile.for_config(tiny_config(num_experts=16), name="other").save(tmp_path / "other.safetensors")
    assert "made for another model" in _cli_error(capsys, base + ["--data", str(good), "--compare", str(other)])
    assert "unknown kind" in _cli_error(capsys, base + ["--data", str(good), "--judge", "sql:x"])
    assert "--alpha needs at least one positive" in _cli_error(capsys, base + ["--data", str(good), "--alpha", "0"])
    assert "--threads must be at least 1" in _cli_error(capsys, base + ["--data", str(good), "--threads", "0"])
    assert "--judge-data needs --judge" in _cli_error(capsys, base + ["--data", str(good), "--judge-data", str(good)])
    judged = base + ["--data", str(good), "--judge", "regex:x", "--judge-data"]
    assert f"--judge-data {tmp_path / 'none.jsonl'}: cannot be read" in _cli_error(
        capsys, judged + [str(tmp_path / "none.jsonl")])
    assert "one.jsonl: all 5 examples have label 1" in _cli_error(capsys, judged + [str(one)])
    nowhere = base[:-2] + [str(tmp_path / "no" / "o.safetensors"), "--no-progress", "--data", str(good)]
    assert "is not a writable folder" in _cli_error(capsys, nowhere)
    family = tmp_path / "mixtral"  # a config.json alone: no weights or tokenizer to capture with
    MixtralConfig(num_hidden_layers=2, num_local_experts=8, architectures=["MixtralForCausalLM"]).save_pretrained(family)
    assert "transformers cannot load its MixtralForCausalLM model and tokenizer" in _cli_error(
        capsys, ["fit", "--model", str(family), *base[3:], "--data", str(good)])
    assert not (tmp_path / "o.safetensors").exists()
