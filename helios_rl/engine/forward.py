"""The layer loop: run a batch of rows through the loaded layers with per-row early exit.

Every row carries a *query window*: the positions whose K/V this layer still lacks, ending at the
row's newest token. For a decode row without pending positions that is one position; for a
prefill it is the whole prompt; under the ``recompute`` strategy, positions that exited early at
an earlier step join the window at the first layer they skipped (their hidden states wait in the
pool's ``hbuf``), so the deep token recomputes them exactly, in the same causal pass. Windows are
*packed* (ragged): row r's ``n[r]`` positions are ``n[r]`` consecutive rows of one ``[T, H]``
tensor, so a layer runs exactly ``T = sum(n)`` positions; only attention scatters the queries into a
per-row grid (:mod:`helios_rl.models.attention`). When every window is one position the plain
``[B, 1, H]`` batch layout is used. ``LayerLoop.row_positions`` counts the positions per layer.

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
- When pending positions join a deeper layer's window (``recompute``): one copy of the packed
  destinations and one of the ``hbuf`` ring indices for all joining rows together, then the step
  geometry is rebuilt (the price of exact K/V for skipped layers).
- After the last layer: one device-to-host copy of the remaining rows' confidence when exits are
  on; token selection then reads all greedy rows' argmax in one copy (``Engine._update``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from helios_rl.engine.exits import CONFIDENCE, ConfidenceExit
from helios_rl.engine.kv_cache import KVPool
from helios_rl.models.attention import Ragged
from helios_rl.models.heads import Readout
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
    """What HF attention sees as its cache: writes this step's K/V, returns each row's history.

    Batch layout (every window one position): ``k`` is ``[B, kv, 1, D]``, one position per row.
    Packed layout: ``k`` is ``[1, kv, T, D]``; position ``t`` belongs to slot ``slot_of[t]`` at
    ``pos_of[t]``, written with one scatter.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def bind(self, g: "_Geometry") -> None:
        self.g = g

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        g = self.g
        if g.ragged is None:
            self.pool.write_last(layer_idx, g.slot_of, g.pos_of, k[:, :, 0], v[:, :, 0])
        else:
            self.pool.write_last(layer_idx, g.slot_of, g.pos_of, k[0].transpose(0, 1), v[0].transpose(0, 1))
        return self.pool.read(layer_idx, g.slots_t, g.contig, g.lmax)


def _contiguous_start(slots: np.ndarray) -> int | None:
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
        return int(slots[0])
    return None


def _offsets(n: np.ndarray) -> np.ndarray:
    """Start of each row's segment in the packed layout."""
    return np.cumsum(n) - n


def _within(n: np.ndarray) -> np.ndarray:
    """0..n[r]-1 for every row, concatenated."""
    return np.arange(int(n.sum())) - np.repeat(_offsets(n), n)


@dataclass
class _Geometry:
    """Index tensors of one step's active rows (rebuilt when rows leave or windows widen)."""

    slots_t: torch.Tensor  # [B] the rows' KV slots
    contig: int | None
    lmax: int
    slot_of: torch.Tensor  # [T] (packed) or [B] (batch): the slot each position writes to
    pos_of: torch.Tensor  # the same, its absolute position
    positions: torch.Tensor  # [1, T] or [B, 1]: what rotary tables and learned positions read
    qpos: torch.Tensor  # [B, Q] query positions in the attention grid (pads repeat the row's last)
    ragged: Ragged | None  # None: batch layout (every window is one position)
    tables: dict
    last: torch.Tensor  # [B] packed index of each row's newest position


class LayerLoop:
    """Runs rows through ``model``'s loaded layers, writing K/V into ``pool``.

    Hidden states are *packed*: row r's window of ``n[r]`` positions occupies ``n[r]`` consecutive
    rows of an ``[T, H]`` tensor, so every layer computes exactly the real positions (no padding to
    the widest window; see :mod:`helios_rl.models.attention`). ``row_positions[l]`` counts the
    positions layer ``l`` ran since the counter was last read (telemetry).
    """

    def __init__(self, model: LayeredModel, pool: KVPool) -> None:
        self.model, self.pool = model, pool
        self.fam = model.family
        self.view = _LayerView(pool)
        self.windows = [self.fam.sliding_window(i) for i in range(model.num_layers)]
        self.row_positions = np.zeros(model.num_layers, dtype=np.int64)

    def take_row_positions(self) -> np.ndarray:
        """Positions run per layer since the last call (and reset the counter)."""
        out, self.row_positions = self.row_positions, np.zeros(self.model.num_layers, dtype=np.int64)
        return out

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
        n = p - pool.kv_len[slots_np, 0] + 1
        if np.any(n < 1):
            raise ValueError("run_rows: every row needs a token without K/V in layer 0")
        ids = np.concatenate([np.asarray(s[len(s) - k:], dtype=np.int64) for s, k in zip(seqs, n)])
        pos0 = np.repeat(p - n + 1, n) + _within(n)
        h = self.fam.embed(torch.as_tensor(ids, device=dev)[None], torch.as_tensor(pos0, device=dev)[None])[0]
        idx = np.arange(len(slots))  # original batch index of each active row
        allow = np.ones(len(slots), dtype=bool) if allow_exit is None else allow_exit.copy()
        exits: list[RowExit] = []
        decider = policy.decider
        decider.begin(len(slots), model.num_layers)
        g: _Geometry | None = None
        masks: dict[int | None, torch.Tensor] = {}
        last = depth - 1
        for layer in range(depth):
            need = p - pool.kv_len[slots_np, layer] + 1
            if np.any(need > n):
                h = self._grow(h, n, need, slots_np, p)
                n = need
                g = None
            if g is None:
                g = self._geometry(h, slots_np, p, n)
                masks = {}
            win = self.windows[layer]
            if win not in masks:
                masks[win] = self._mask(g.qpos, g.lmax, win)
            self.view.bind(g)
            x = h[:, None] if g.ragged is None else h[None]
            extra = {} if g.ragged is None else {"helios_ragged": g.ragged}
            x = self.fam.run_layer(layer, x, masks[win], self.view, g.tables, g.positions, **extra)
            h = x[:, 0] if g.ragged is None else x[0]
            self.row_positions[layer] += h.shape[0]
            pool.kv_len[slots_np, layer] = p + 1
            if layer == last:
                break
            if layer in policy.layers and allow.any():
                readout = model.heads.readout(layer, h.index_select(0, g.last))
                # the exit decision's one host sync at this layer: every active row's confidence at once
                conf_np = readout.confidence(policy.measure).float().cpu().numpy()
                thr = policy.thresholds.get(layer, 1.1)
                out = decider.decide(layer, conf_np, thr, idx) & allow
                if out.any():
                    rows = np.nonzero(out)[0]
                    logits = readout.logits(torch.as_tensor(rows, device=dev))  # full width for leaving rows only
                    for i, r in enumerate(rows):
                        exits.append(RowExit(int(idx[r]), layer, logits[i], float(conf_np[r]), False))
                    self._leave(layer, h, rows, slots_np, p, n, policy, depth)
                    keep = ~out
                    if not keep.any():
                        return exits
                    kept = np.nonzero(np.repeat(keep, n))[0]
                    h = h.index_select(0, torch.as_tensor(kept, device=dev))
                    slots_np, p, n, idx, allow = slots_np[keep], p[keep], n[keep], idx[keep], allow[keep]
                    g = None
        hl = h.index_select(0, g.last)
        full = depth == model.num_layers
        readout = Readout(full=model.heads.final_logits(hl)) if full else model.heads.readout(last, hl)
        logits = readout.logits()
        conf_np = None
        if policy.track_confidence or not full:
            conf_np = readout.confidence(policy.measure).float().cpu().numpy()
        if full:  # the model's own output: no exit, nothing to breach
            greedy = np.zeros(len(idx), dtype=bool)
        else:  # below full depth a token leaves here unless it meets this layer's calibrated threshold
            thr = policy.thresholds.get(last, 1.1) if last in policy.layers else 1.1
            greedy = decider.greedy(last, conf_np.astype(np.float64), thr, idx)
        for r in range(len(idx)):
            c = None if conf_np is None else float(conf_np[r])
            exits.append(RowExit(int(idx[r]), last, logits[r], c, bool(greedy[r])))
        return exits

    # ----- helpers -------------------------------------------------------------------------------
    def _geometry(self, h: torch.Tensor, slots: np.ndarray, p: np.ndarray, n: np.ndarray) -> _Geometry:
        dev = self.model.device
        slots_t = torch.as_tensor(slots, device=dev)
        q = int(n.max())
        last = torch.as_tensor(np.cumsum(n) - 1, device=dev)
        if q == 1:  # batch layout: [B, 1, H]
            pos_t = torch.as_tensor(p, device=dev)
            positions = pos_t[:, None]
            return _Geometry(slots_t, _contiguous_start(slots), int(p.max()) + 1, slots_t, pos_t, positions,
                             positions, None, self.fam.position_tables(h[:, None], positions), last)
        within = _within(n)
        pos = np.repeat(p - n + 1, n) + within
        rows = np.repeat(np.arange(len(n)), n)
        qpos = np.repeat(p[:, None], q, axis=1)  # pad queries sit at the row's newest position
        qpos[rows, within] = pos
        pos_t = torch.as_tensor(pos, device=dev)
        positions = pos_t[None]
        ragged = Ragged(torch.as_tensor(rows * q + within, device=dev), len(n), q)
        return _Geometry(slots_t, _contiguous_start(slots), int(p.max()) + 1, torch.as_tensor(np.repeat(slots, n), device=dev),
                         pos_t, positions, torch.as_tensor(qpos, device=dev), ragged,
                         self.fam.position_tables(h[None], positions), last)

    def _mask(self, qpos: torch.Tensor, lmax: int, window: int | None) -> torch.Tensor:
        """Bool [B, 1, Q, L]: key k visible to query at position qp iff k <= qp (and within the window)."""
        keys = torch.arange(lmax, device=qpos.device)[None, None, :]
        qp = qpos[:, :, None]
        m = keys <= qp
        if window is not None:
            m &= keys > qp - window
        return m[:, None]

    def _grow(self, h: torch.Tensor, n: np.ndarray, need: np.ndarray, slots: np.ndarray, p: np.ndarray):
        """Widen the windows: positions that skipped this layer join from ``hbuf``, in front of each
        row's segment (two scatters for the whole batch)."""
        hbuf, w = self.pool.hbuf, self.pool.pending_window
        add = need - n
        start = _offsets(need)
        out = h.new_empty(int(need.sum()), h.shape[1])
        dev = h.device
        old_dst = np.repeat(start + add, n) + _within(n)
        out[torch.as_tensor(old_dst, device=dev)] = h
        j = _within(add)
        new_dst = np.repeat(start, add) + j
        ring = (np.repeat(p - need + 1, add) + j) % w
        src = torch.as_tensor(np.stack([np.repeat(slots, add), ring]), device=hbuf.device)
        out[torch.as_tensor(new_dst, device=dev)] = hbuf[src[0], src[1]]
        return out

    def _leave(self, layer: int, h: torch.Tensor, rows: np.ndarray, slots: np.ndarray, p: np.ndarray,
               n: np.ndarray, policy: ExitPolicy, depth: int) -> None:
        """Rows ``rows`` exit after ``layer``: keep deeper layers' K/V recoverable (or fill them)."""
        start = _offsets(n)
        if policy.kv_strategy == "recompute":
            # every leaving row's window positions in one scatter (one host-to-device index copy);
            # destinations are distinct: a row may exit only with at most ``pending_window`` pending
            hbuf, w = self.pool.hbuf, self.pool.pending_window
            k = n[rows]
            offs = _within(k)
            src = np.repeat(start[rows], k) + offs
            dst_pos = np.repeat(p[rows] - k + 1, k) + offs
            index = torch.as_tensor(np.stack([src, np.repeat(slots[rows], k), dst_pos % w]), device=hbuf.device)
            hbuf[index[1], index[2]] = h[index[0]]
            return
        # copy (CALM): the exit hidden state stands in as the input of every skipped layer
        newest = torch.as_tensor(start[rows] + n[rows] - 1, device=h.device)
        hx = h.index_select(0, newest)[:, None]
        pos = torch.as_tensor(p[rows], device=h.device)[:, None]
        tables = self.fam.position_tables(hx, pos)
        sl = torch.as_tensor(slots[rows], device=h.device)
        for lay in range(layer + 1, depth):
            k, v = self.fam.layer_kv(lay, hx, tables, pos)
            self.pool.write_last(lay, sl, pos[:, 0], k[:, :, 0], v[:, :, 0])
            self.pool.kv_len[slots[rows], lay] = p[rows] + 1
