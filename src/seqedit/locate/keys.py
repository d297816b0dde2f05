"""Keys: the FFN-out input at the subject's last token, averaged over context templates.

``k_f = ½·k(bare prompt) + ½·mean_j k(prefix_j + prompt)`` (MEMIT's two template groups), per prompt
format (``locate/chat.py``). With ``prompt_format="both"`` a fact has either one key, the bare and the
chat average weighing ½ each, or (``split=True``) one key column per format. One batched forward over
all rows reads every requested layer's keys and the z-layer block output of the primary rows, and
stops after the deepest layer needed: nothing above it is computed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from ..facts import Fact
from .chat import encode_row, formats
from .tokens import EncodedPrompt, pad_id_of, pad_right
from .trace import LowerBlocksReplay, block_hidden, capture_inputs, hooks, run_truncated, stop_after


@dataclass(frozen=True)
class ContextRows:
    """The n·F·T encoded rows of n facts in F row formats under T templates, fact-major
    (row = (f·F + g)·T + t). Each fact has ``columns`` key columns: one averaged over its formats, or
    (``split``) one per format, column ``f·F + g``. A column's primary row is the row of its first
    format under template 0: where ``h0`` and the z-layer state ``H`` are read."""

    rows: tuple[EncodedPrompt, ...]
    n_facts: int
    n_templates: int
    n_formats: int = 1
    split: bool = False

    @classmethod
    def build(cls, tokenizer, facts: Sequence[Fact], templates: Sequence[str],
              prompt_format: str = "bare", split: bool = False) -> "ContextRows":
        fmts = formats(prompt_format)
        rows = tuple(encode_row(tokenizer, g, t, f.prompt, f.subject) for f in facts for g in fmts for t in templates)
        return cls(rows, len(facts), len(templates), len(fmts), split)

    @property
    def per_fact(self) -> int:
        return self.n_formats * self.n_templates

    @property
    def columns(self) -> int:
        """Key columns per fact."""
        return self.n_formats if self.split else 1

    def template_weights(self) -> torch.Tensor:
        """``[F·T, columns]`` averaging weights of a fact's rows into its columns: per format ½ for the
        bare template and ½ shared by the others; averaged, the formats weigh ``1/F`` each."""
        t = self.n_templates
        if t == 1:
            one = torch.ones(1, dtype=torch.float64)
        else:
            one = torch.tensor([0.5] + [0.5 / (t - 1)] * (t - 1), dtype=torch.float64)
        if self.split:
            return torch.block_diag(*[one[:, None]] * self.n_formats)
        return (one.repeat(self.n_formats) / self.n_formats)[:, None]

    def primary_rows(self) -> list[int]:
        """Index within a fact's rows of each column's primary row."""
        return [g * self.n_templates for g in range(self.columns)]


@dataclass
class KeyReadout:
    """``keys[layer]: [d_in, n·c]`` (float64, template-averaged; c = ``ContextRows.columns``, fact-major);
    ``z_hidden: [d_out, n·c]`` (each column's primary row)."""

    keys: dict[int, torch.Tensor]
    z_hidden: torch.Tensor | None


class KeyReader:
    """Reads keys and z-layer states of fixed rows, repeatedly, as the model is edited layer by layer.

    ``read(..., frozen_below=ℓ)`` promises that blocks below ℓ will not change any more: the read
    records the output of block ℓ−1 and later reads replay it, running only the blocks from ℓ up.
    Within a step (layers edited in ascending order) each read thus runs the blocks between the
    previous edited layer and the current one. Rows are encoded once, sorted by length so that each
    batch pads little, and truncated after the subject's last token (nothing after it is read).
    """

    def __init__(self, loaded, ctx: ContextRows, batch_rows: int = 256):
        self.loaded, self.ctx = loaded, ctx
        pad = pad_id_of(loaded.tokenizer)
        order = sorted(range(len(ctx.rows)), key=lambda i: ctx.rows[i].subject_last)
        self.order = torch.tensor(order)
        self.batches = []
        for lo in range(0, len(order), batch_rows):
            chunk = [ctx.rows[i] for i in order[lo : lo + batch_rows]]
            # causal attention: tokens after the subject's last one cannot affect what is read there
            ids, mask = pad_right([r.ids[: r.subject_last + 1] for r in chunk], pad)
            idx = torch.tensor([r.subject_last for r in chunk])
            self.batches.append([ids, mask, idx, None])  # last: the replay of frozen blocks

    @torch.no_grad()
    def read(
        self, layers: Sequence[int], z_layer: int | None = None, frozen_below: int = 0
    ) -> KeyReadout:
        """Keys at ``layers`` (``[d_in, n·c]`` each) and the z-layer block output on the columns' primary
        rows (``[d_out, n·c]``); c key columns per fact (``ContextRows.columns``)."""
        adapter, model, ctx = self.loaded.adapter, self.loaded.model, self.ctx
        device = self.loaded.input_device
        stop_layer = max([*layers, *([z_layer] if z_layer is not None else [])])
        if frozen_below > stop_layer + 1:
            raise ValueError(f"frozen_below={frozen_below} lies above the deepest block read ({stop_layer})")
        per_row: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
        z_rows: list[torch.Tensor] = []
        for batch in self.batches:
            ids, mask, idx, replay = batch
            got: dict[int, torch.Tensor] = {}

            # the hooks live for this batch only: bind its containers and rows explicitly
            def reader(layer: int, got: dict[int, torch.Tensor] = got, idx: torch.Tensor = idx):
                def fn(x: torch.Tensor) -> None:
                    got[layer] = _at_rows(x, idx)

                return fn

            def z_reader(_m, _a, out, idx: torch.Tensor = idx) -> None:
                z_rows.append(_at_rows(block_hidden(out), idx))

            handles = [capture_inputs(adapter.ffn_out(l), reader(l)) for l in layers]
            if z_layer is not None:
                handles.append(adapter.block(z_layer).register_forward_hook(z_reader))
            nxt = None
            if frozen_below > 0 and (replay is None or len(replay.blocks) < frozen_below):
                nxt = LowerBlocksReplay(adapter, frozen_below - 1)
                handles.append(nxt.blocks[-1].register_forward_hook(nxt.recorder()))
            # registered last so that it runs after the readers of the same block
            handles.append(stop_after(adapter.block(stop_layer)))
            skip = replay.skipping() if replay is not None else nullcontext()
            with hooks(handles), skip:
                run_truncated(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            if nxt is not None:
                batch[3] = nxt
            for l in layers:
                per_row[l].append(got[l])

        w = ctx.template_weights()
        inverse = torch.argsort(self.order)
        keys = {
            l: torch.einsum(
                "ftd,tc->dfc", torch.cat(per_row[l])[inverse].view(ctx.n_facts, ctx.per_fact, -1), w
            ).reshape(-1, ctx.n_facts * ctx.columns)
            for l in layers
        }
        z_hidden = None
        if z_rows:
            z_all = torch.cat(z_rows)[inverse].view(ctx.n_facts, ctx.per_fact, -1)
            z_hidden = z_all[:, ctx.primary_rows()].reshape(ctx.n_facts * ctx.columns, -1).T.contiguous()
        return KeyReadout(keys, z_hidden)


def _at_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[r, idx[r]]`` for every row ``r`` of ``x: [rows, T, d]``, as float64 on the host (``[rows, d]``).

    The indices go to ``x``'s own device: with a device map each block's tensors live where it runs.
    """
    idx = idx.to(x.device)
    rows = torch.arange(len(idx), device=x.device)
    return x[rows, idx].detach().to(torch.float64).cpu()


def read_keys(
    loaded,
    ctx: ContextRows,
    layers: Sequence[int],
    z_layer: int | None = None,
    batch_rows: int = 256,
) -> KeyReadout:
    """Read keys at ``layers`` (and the block output of ``z_layer`` on primary rows) on the current model."""
    return KeyReader(loaded, ctx, batch_rows).read(layers, z_layer)
