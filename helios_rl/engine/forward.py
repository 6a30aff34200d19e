"""The layer loop: run a batch of rows through the loaded layers with per-row early exit.

Every row carries a *query window*: the positions whose K/V this layer still lacks, ending at the
row's newest token. For a decode row without pending positions that is one position; for a
prefill it is the whole prompt; under the ``recompute`` strategy, positions that exited early at
an earlier step join the window at the first layer they skipped (their hidden states wait in the
pool's ``hbuf``), so the deep token recomputes them exactly, in the same causal pass. Windows are
right-aligned in a padded ``[B, Q, H]`` tensor; pad queries write nothing and are discarded.

Which rows leave at an exit layer is asked of the policy's decider (:mod:`helios_rl.engine.exits`:
confidence >= threshold, or a replayed exit distribution for speed studies); the loop itself only
computes the exit logits and confidence, compacts the rows that continue and books the exits.

Host synchronisation on CUDA (what waits for the GPU, and how it is batched):

- Per layer without exits: none. K/V are written and read with device index tensors built once
  per step (slot ids, positions, masks, rotary tables: a few small host-to-device copies before
  layer 0), ``kv_len`` bookkeeping is NumPy on the host, and the decoder layer itself does not sync.
- At each exit layer of the serving config (and only while some row may still exit): exactly one
  device-to-host copy, the confidence of all active rows together (``[B]`` floats), which the
  exit decision needs. The replay decider does not read it to decide, but the copy is kept so that
  a replayed run costs what a real one does.
- Only when rows leave at that layer: one host-to-device copy of the kept rows' indices (compaction),
  one of the leaving rows' ``hbuf`` destinations (``recompute``, all leaving rows together), and the
  step geometry for the remaining rows is rebuilt (slot ids and positions: two small copies).
- When pending positions join a deeper layer's window (``recompute``), their ``hbuf`` ring indices
  are copied per joining row (the price of exact K/V for skipped layers).
- After the last layer: one device-to-host copy of the remaining rows' confidence when exits are
  on; token selection then reads all greedy rows' argmax in one copy (``Engine._update``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from helios_rl.engine.exits import CONFIDENCE, ConfidenceExit
from helios_rl.engine.kv_cache import KVPool
from helios_rl.models.heads import confidence
from helios_rl.models.layered import LayeredModel


@dataclass
class RowExit:
    """How one row left the layer loop."""

    index: int  # index into the batch handed to ``run_rows``
    layer: int
    logits: torch.Tensor  # [V]
    conf: float | None
    greedy: bool  # reached the last loaded layer without passing a threshold


@dataclass
class ExitPolicy:
    """Where rows may exit and at what confidence."""

    layers: frozenset[int] = frozenset()
    thresholds: dict[int, float] = field(default_factory=dict)
    measure: str = "max_prob"
    kv_strategy: str = "recompute"
    track_confidence: bool = False
    decider: ConfidenceExit = CONFIDENCE  # who decides which rows leave (see helios_rl.engine.exits)


class _LayerView:
    """What HF attention sees as ``past_key_values``: writes this step's K/V, returns the history."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def bind(self, slots_np, slots_t, pos_t, n, p, q, contig, lmax) -> None:
        self.slots_np, self.slots_t, self.pos_t = slots_np, slots_t, pos_t
        self.n, self.p, self.q, self.contig, self.lmax = n, p, q, contig, lmax

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.q == 1:
            self.pool.write_last(layer_idx, self.slots_t, self.pos_t, k[:, :, 0], v[:, :, 0])
        else:
            for r in range(len(self.slots_np)):
                n = int(self.n[r])
                self.pool.write_range(layer_idx, int(self.slots_np[r]), int(self.p[r]) - n + 1,
                                      k[r, :, self.q - n:], v[r, :, self.q - n:])
        return self.pool.read(layer_idx, self.slots_t, self.contig, self.lmax)


def _contiguous_start(slots: np.ndarray) -> int | None:
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
        return int(slots[0])
    return None


class LayerLoop:
    """Runs rows through ``model``'s loaded layers, writing K/V into ``pool``."""

    def __init__(self, model: LayeredModel, pool: KVPool) -> None:
        self.model, self.pool = model, pool
        self.fam = model.family
        self.view = _LayerView(pool)
        self.windows = [self.fam.sliding_window(i) for i in range(model.num_layers)]

    def run_rows(self, slots: list[int], seqs: list[list[int]], policy: ExitPolicy,
                 allow_exit: np.ndarray | None = None) -> list[RowExit]:
        """Advance each row by its newest token; rows' earlier positions must be in the pool.

        ``seqs[r]`` is row r's whole token sequence; positions from the pool's layer-0 ``kv_len``
        to the end are embedded and run. ``allow_exit[r]`` False forces row r to the last layer.
        """
        model, pool, dev = self.model, self.pool, self.model.device
        depth = model.depth
        slots_np = np.asarray(slots, dtype=np.int64)
        p = np.asarray([len(s) - 1 for s in seqs], dtype=np.int64)
        n = np.maximum(p - pool.kv_len[slots_np, 0] + 1, 0)
        q = int(n.max())
        ids = torch.zeros(len(slots), q, dtype=torch.long)
        for r, s in enumerate(seqs):
            if n[r]:
                ids[r, q - n[r]:] = torch.as_tensor(s[len(s) - n[r]:])
        pos = self._positions(p, q)
        h = self.fam.embed(ids.to(dev), pos)  # q == 0 (flush): an empty window that grows from hbuf
        idx = np.arange(len(slots))  # original batch index of each active row
        allow = np.ones(len(slots), dtype=bool) if allow_exit is None else allow_exit.copy()
        exits: list[RowExit] = []
        decider = policy.decider
        decider.begin(len(slots), model.num_layers)
        geometry = None
        last = depth - 1
        for layer in range(depth):
            need = p - pool.kv_len[slots_np, layer] + 1
            if np.any(need > n):
                h = self._grow(h, n, need, slots_np, p)
                n = need
                geometry = None
            q = h.shape[1]
            if q == 0:
                continue
            if geometry is None:
                slots_t = torch.as_tensor(slots_np, device=dev)
                pos = self._positions(p, q)
                tables = self.fam.position_tables(h, pos)
                masks: dict[int | None, torch.Tensor] = {}
                pos_last = torch.as_tensor(p, device=dev)
                contig = _contiguous_start(slots_np)
                lmax = int(p.max()) + 1
                geometry = True
            win = self.windows[layer]
            if win not in masks:
                masks[win] = self._mask(pos, lmax, win)
            self.view.bind(slots_np, slots_t, pos_last, n, p, q, contig, lmax)
            h = self.fam.run_layer(layer, h, masks[win], self.view, tables, pos)
            pool.kv_len[slots_np, layer] = p + 1
            if layer == last:
                break
            if layer in policy.layers and allow.any():
                logits = model.heads.logits(layer, h[:, -1])
                # the exit decision's one host sync at this layer: every active row's confidence at once
                conf_np = confidence(logits, policy.measure).float().cpu().numpy()
                thr = policy.thresholds.get(layer, 1.1)
                out = decider.decide(layer, conf_np, thr, idx) & allow
                if out.any():
                    rows = np.nonzero(out)[0]
                    for r in rows:
                        exits.append(RowExit(int(idx[r]), layer, logits[r], float(conf_np[r]), False))
                    self._leave(layer, h, rows, slots_np, p, n, policy, depth)
                    keep = ~out
                    if not keep.any():
                        return exits
                    kt = torch.as_tensor(np.nonzero(keep)[0], device=dev)
                    h = h.index_select(0, kt)
                    slots_np, p, n, idx, allow = slots_np[keep], p[keep], n[keep], idx[keep], allow[keep]
                    width = int(n.max())
                    if width < h.shape[1]:  # the widest windows may have left: drop their padding
                        h = h[:, h.shape[1] - width:]
                    geometry = None
        hl = h[:, -1]
        logits = model.heads.final_logits(hl) if depth == model.num_layers else model.heads.logits(last, hl)
        conf_np = None
        if policy.track_confidence:
            conf_np = confidence(logits, policy.measure).float().cpu().numpy()
        greedy = (decider.greedy(last, None if conf_np is None else conf_np.astype(np.float64),
                                 policy.thresholds.get(last, 1.1), idx)
                  if policy.layers else np.zeros(len(idx), dtype=bool))
        for r in range(len(idx)):
            c = None if conf_np is None else float(conf_np[r])
            exits.append(RowExit(int(idx[r]), last, logits[r], c, bool(greedy[r])))
        return exits

    # ----- helpers -------------------------------------------------------------------------------
    def _positions(self, p: np.ndarray, q: int) -> torch.Tensor:
        pos = torch.as_tensor(p)[:, None] - (q - 1) + torch.arange(q)[None, :]
        return pos.clamp_min(0).to(self.model.device)

    def _mask(self, pos: torch.Tensor, lmax: int, window: int | None) -> torch.Tensor:
        """Bool [B, 1, Q, L]: key k visible to query at position qp iff k <= qp (and within the window)."""
        keys = torch.arange(lmax, device=pos.device)[None, None, :]
        qp = pos[:, :, None]
        m = keys <= qp
        if window is not None:
            m &= keys > qp - window
        return m[:, None]

    def _grow(self, h: torch.Tensor, n: np.ndarray, need: np.ndarray, slots: np.ndarray, p: np.ndarray):
        """Widen the query window: positions that skipped this layer join from ``hbuf``."""
        hbuf, w = self.pool.hbuf, self.pool.pending_window
        qn = int(need.max())
        out = h.new_zeros(h.shape[0], qn, h.shape[2])
        out[:, qn - h.shape[1]:] = h
        for r in np.nonzero(need > n)[0]:
            first = int(p[r] - need[r] + 1)
            last = int(p[r] - n[r] + 1)
            ring = torch.arange(first, last) % w
            out[r, qn - need[r]: qn - n[r]] = hbuf[int(slots[r]), ring.to(hbuf.device)]
        return out

    def _leave(self, layer: int, h: torch.Tensor, rows: np.ndarray, slots: np.ndarray, p: np.ndarray,
               n: np.ndarray, policy: ExitPolicy, depth: int) -> None:
        """Rows ``rows`` exit after ``layer``: keep deeper layers' K/V recoverable (or fill them)."""
        q = h.shape[1]
        if policy.kv_strategy == "recompute":
            # every leaving row's window positions in one scatter (one host-to-device index copy);
            # destinations are distinct: a row may exit only with at most ``pending_window`` pending
            hbuf, w = self.pool.hbuf, self.pool.pending_window
            k = n[rows].astype(np.int64)
            src_row = np.repeat(rows, k)
            offs = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)  # 0..k_r-1 within each row
            src_col = q - np.repeat(k, k) + offs
            dst_pos = np.repeat(p[rows] - k + 1, k) + offs
            index = torch.as_tensor(np.stack([src_row, src_col, slots[src_row], dst_pos % w]), device=hbuf.device)
            hbuf[index[2], index[3]] = h[index[0], index[1]]
            return
        # copy (CALM): the exit hidden state stands in as the input of every skipped layer
        rt = torch.as_tensor(rows, device=h.device)
        hx = h.index_select(0, rt)[:, -1:]
        pos = torch.as_tensor(p[rows], device=h.device)[:, None]
        tables = self.fam.position_tables(hx, pos)
        sl = torch.as_tensor(slots[rows], device=h.device)
        for lay in range(layer + 1, depth):
            k, v = self.fam.layer_kv(lay, hx, tables, pos)
            self.pool.write_last(lay, sl, pos[:, 0], k[:, :, 0], v[:, :, 0])
            self.pool.kv_len[slots[rows], lay] = p[rows] + 1
