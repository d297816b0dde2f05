"""Keys: the FFN-out input at the subject's last token, averaged over context templates.

``k_f = ½·k(bare prompt) + ½·mean_j k(prefix_j + prompt)`` (MEMIT's two template groups). One
batched forward over all rows reads every requested layer's keys and the z-layer block output of
the bare rows, and stops after the deepest layer needed: nothing above it is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..facts import Fact
from .tokens import EncodedPrompt, encode_prompt, pad_id_of, pad_right
from .trace import block_hidden, capture_inputs, hooks, run_truncated, stop_after


@dataclass(frozen=True)
class ContextRows:
    """The n·T encoded rows of n facts under T templates, fact-major (row = f·T + t)."""

    rows: tuple[EncodedPrompt, ...]
    n_facts: int
    n_templates: int

    @classmethod
    def build(cls, tokenizer, facts: Sequence[Fact], templates: Sequence[str]) -> "ContextRows":
        rows = tuple(encode_prompt(tokenizer, t, f.prompt, f.subject) for f in facts for t in templates)
        return cls(rows, len(facts), len(templates))

    def template_weights(self) -> torch.Tensor:
        """``[T]`` averaging weights: ½ for the bare template, ½ shared by the others."""
        t = self.n_templates
        if t == 1:
            return torch.ones(1, dtype=torch.float64)
        return torch.tensor([0.5] + [0.5 / (t - 1)] * (t - 1), dtype=torch.float64)


@dataclass
class KeyReadout:
    """``keys[layer]: [d_in, n]`` (float64, template-averaged); ``z_hidden: [d_out, n]`` (bare rows)."""

    keys: dict[int, torch.Tensor]
    z_hidden: torch.Tensor | None


@torch.no_grad()
def read_keys(
    loaded,
    ctx: ContextRows,
    layers: Sequence[int],
    z_layer: int | None = None,
    batch_rows: int = 256,
) -> KeyReadout:
    """Read keys at ``layers`` (and the block output of ``z_layer`` on bare rows) on the current model."""
    adapter, model = loaded.adapter, loaded.model
    device = next(model.parameters()).device
    pad = pad_id_of(loaded.tokenizer)
    stop_layer = max([*layers, *([z_layer] if z_layer is not None else [])])
    n_rows = len(ctx.rows)
    per_row: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    z_rows: list[torch.Tensor] = []
    for lo in range(0, n_rows, batch_rows):
        chunk = ctx.rows[lo : lo + batch_rows]
        ids, mask = pad_right([r.ids for r in chunk], pad)
        idx = torch.tensor([r.subject_last for r in chunk], device=device)
        ar = torch.arange(len(chunk), device=device)
        got: dict[int, torch.Tensor] = {}
        z_out: list[torch.Tensor] = []

        def reader(layer: int):
            def fn(x: torch.Tensor) -> None:
                got[layer] = x[ar, idx].detach().to(torch.float64).cpu()

            return fn

        def z_reader(_m, _a, out) -> None:
            z_out.append(block_hidden(out)[ar, idx].detach().to(torch.float64).cpu())

        handles = [capture_inputs(adapter.ffn_out(l), reader(l)) for l in layers]
        if z_layer is not None:
            handles.append(adapter.block(z_layer).register_forward_hook(z_reader))
        # registered last so that it runs after the readers of the same block
        handles.append(stop_after(adapter.block(stop_layer)))
        with hooks(handles):
            run_truncated(model, input_ids=ids.to(device), attention_mask=mask.to(device))
        for l in layers:
            per_row[l].append(got[l])
        z_rows.extend(z_out)

    w = ctx.template_weights()
    keys = {
        l: torch.einsum("ftd,t->df", torch.cat(per_row[l]).view(ctx.n_facts, ctx.n_templates, -1), w)
        for l in layers
    }
    z_hidden = None
    if z_rows:
        z_hidden = torch.cat(z_rows).view(ctx.n_facts, ctx.n_templates, -1)[:, 0].T.contiguous()
    return KeyReadout(keys, z_hidden)

