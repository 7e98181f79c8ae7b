"""The surrogate: a small classifier that predicts the behaviour (label 1) from a routing trace.

MASCing's shape. Shapes: B examples, T tokens, L layers, E experts of a layer's pool.

    x [B, T, L, E] raw router logits
      -> LayerNorm over E                     (the scale of a model's logits drops out)
      -> Linear E -> 16, SHARED by all layers (one expert embedding, as MASCing's)
      -> flatten layers: [B, T, L * 16]
      -> LSTM (hidden 64) over the tokens, last hidden state
      -> Linear 64 -> 1: the logit of label 1

Trained with BCE and Adam. A bias enters exactly as the engine applies it
(`steer_traces`: kernels.routing_reference.steer_logits, per token and layer). Masks have
no exact form in logits a LayerNorm can read (the engine removes an excluded expert, an
-inf here), so the surrogate sees their effect on the choice in finite values: an
excluded expert's logit drops to the lowest of its token's row, an included one rises to
the highest of the others (the engine's ceiling), both after the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from tqdm.auto import tqdm

from unipool_serve.kernels.routing_reference import EXCLUDE, INCLUDE, steer_logits

EMBED, HIDDEN = 16, 64


class RoutingSurrogate(nn.Module):
    """Logit of "this routing trace shows the behaviour" (label 1)."""

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(num_experts)
        self.expert_embed = nn.Linear(num_experts, EMBED)
        self.lstm = nn.LSTM(num_layers * EMBED, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[:2]
        h = self.expert_embed(self.norm(x)).reshape(batch, tokens, -1)  # [B, T, L * 16]
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # last: [1, B, 64]
        return self.head(last[-1]).squeeze(-1)  # [B]


def pad(traces: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T_max, L, E] fp32 zero-padded, and the lengths [B]. Called per batch: traces may be kept
    in fp16 (as a server sends them), and a whole data set padded at once would not fit in memory
    for a large model (48 layers x 128 experts is 24 KiB per token in fp32)."""
    return pad_sequence([t.float() for t in traces], batch_first=True), torch.tensor([len(t) for t in traces])


def steer_traces(x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, L, E] raw logits steered by bias [L, E] (alpha folded in), per token and layer as the
    engine does: z + sigma_t * bias[l]; then, with mask [L, E] int8, excluded experts set to their
    row's lowest logit and included ones to the highest of the rest (the module doc). Differentiable
    in `bias`. Zero padding stays zero (sigma 0, and its row's lowest and highest are 0)."""
    experts = x.shape[-1]
    if bias is not None:
        rows = bias.expand_as(x).reshape(-1, experts)
        x = steer_logits(x.reshape(-1, experts), rows).reshape(x.shape)
    if mask is None or not bool(mask.any()):
        return x
    exclude, include = (mask == EXCLUDE).expand_as(x), (mask == INCLUDE).expand_as(x)
    floor = x.amin(dim=-1, keepdim=True).expand_as(x)
    x = torch.where(exclude, floor, x)
    ceiling = x.masked_fill(exclude, float("-inf")).amax(dim=-1, keepdim=True).expand_as(x)
    return torch.where(include, ceiling, x)


def batches(count: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for i in range(0, count, batch_size):
        yield order[i:i + batch_size]


def train_surrogate(traces: Sequence[torch.Tensor], labels: Sequence[int], *, seed: int, epochs: int = 30,
                    lr: float = 0.01, batch_size: int = 32, progress: bool = True) -> RoutingSurrogate:
    """BCE on labels (1 = behaviour), Adam; initial weights and batch order from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = RoutingSurrogate(traces[0].shape[1], traces[0].shape[2])
    y = torch.tensor(labels, dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    bar = tqdm(range(epochs), desc="train surrogate", unit="epoch", disable=not progress)
    for _ in bar:
        total = 0.0
        for idx in batches(len(traces), batch_size, generator):
            optimiser.zero_grad()
            loss = loss_fn(model(*pad([traces[int(i)] for i in idx])), y[idx])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{total / len(traces):.4f}")
    return model.eval()


@torch.no_grad()
def probabilities(model: RoutingSurrogate, traces: Sequence[torch.Tensor], bias: torch.Tensor | None = None,
                  batch_size: int = 256, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P(label 1) per trace [N], with the traces steered by `bias` [L, E] (alpha folded in) and `mask`
    [L, E] int8 where given."""
    out = []
    for idx in batches(len(traces), batch_size, None):
        x, lengths = pad([traces[int(i)] for i in idx])
        if bias is not None or mask is not None:
            x = steer_traces(x, bias, mask)
        out.append(torch.sigmoid(model(x, lengths)))
    return torch.cat(out)


def accuracy(model: RoutingSurrogate, traces: Sequence[torch.Tensor], labels: Sequence[int]) -> float:
    predicted = probabilities(model, traces) > 0.5
    return float((predicted == torch.tensor(labels, dtype=torch.bool)).float().mean())
