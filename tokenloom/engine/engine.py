"""Continuous batching: requests join and leave the running batch at every step.

`Engine.step()` does, in order:

1. admit waiting requests whose rows fit and prefill them, one after another, each alone in its
   own cache row, until `prefill_chunk` prompt tokens were read: a long prompt goes a chunk
   per step, so running sequences keep streaming while it is read (all of it when nobody runs);
2. decode: every running request chooses its next tokens from its rows' logits (requests.py),
   finished rows are freed and the last rows move into the holes, and one forward pass runs
   a token for every row. The new logits go back to their requests.

A request's numbers do not depend on its neighbours: it is prefilled alone, always in the same
chunks, and the decode step is shaped so that each row's result is independent of the batch
(see slots.py). With its seed, a request gives the same tokens alone or among any others.

The engine works on token ids and is driven by one thread: the caller's (`Model.generate`) or
the server's loop (serving.py).
"""

from __future__ import annotations

from collections import deque

import torch

from tokenloom.engine.request import Request, usable_rows
from tokenloom.engine.slots import SlotCache, _round
from tokenloom.heap import trim_heap

TRIM_GROWTH = 4 << 20  # once the process grew this much, freed heap memory goes back to the OS (heap.py)
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds a chunk's activations and attention scores
# columns reserved past a prompt for its first new tokens (up to max_new_tokens): without them the
# first decode step regrew the cache (a 512-token prompt: 512 -> 640 columns, ~6% of the prefill's
# time), and a batch of short prompts regrew it mid-decode (more RSS: old and new side by side)
DECODE_HEADROOM = 64


class Engine:
    def __init__(self, model, dtype=torch.float32, device="cpu", max_batch: int = 32,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.encoder_decoder = getattr(model, "is_encoder_decoder", False)
        self.cache = SlotCache(model, dtype, device)
        # a step whose requests all take the plain argmax asks the head for it (Q8Linear.argmax),
        # without the (rows, vocabulary) logits
        head = getattr(model, "lm_head", None)
        self.argmax_head = head if getattr(model, "separable_head", False) and hasattr(head, "argmax") else None
        self.waiting: deque[Request] = deque()
        self.prefilling: _Prefill | None = None
        self.running: list[Request] = []  # decoding, in admission order
        self.owner: list[Request | None] = []  # row -> request, for rows [0, len(owner))
        self.steps = 0

    # ------------------------------------------------------------------ requests

    def check(self, request: Request) -> None:
        """Refuse a request that could never run here (more rows than the batch has)."""
        if request.rows_needed > self.max_batch:
            from tokenloom.errors import InvalidParameterError
            field = "num_beams" if request.config.num_beams > 1 else "num_return_sequences"
            raise InvalidParameterError(field, request.rows_needed, f"at most {self.max_batch} (the engine's batch)")

    def add(self, request: Request) -> None:
        self.check(request)
        self.waiting.append(request)

    def abort(self, request: Request, reason: str = "abort") -> None:
        """End a request now, wherever it is; its cache rows are freed at once."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif self.prefilling is not None and self.prefilling.request is request:
            self.cache.clear(self.prefilling.row, scrub=True)
            self.prefilling = None
        elif request in self.running:
            self._release(request)
        request.finish_all(reason)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def live_rows(self) -> int:
        return len(self.owner)

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        self.steps += 1
        self._read_prompts()
        if self.running:
            self._decode_step()
        if not self.has_work:
            self.cache.release()  # idle: memory goes back to its baseline
        trim_heap(0 if not self.has_work else TRIM_GROWTH)

    def _read_prompts(self) -> None:
        """Admit and prefill waiting requests until `prefill_chunk` prompt tokens were read.

        Requests that arrive together (a batch, a burst at the server) then start decoding
        together instead of joining one per step. A long prompt still goes a chunk per step,
        so the running rows keep streaming while it is read."""
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                if not (self.waiting and self._fits(self.waiting[0])):
                    return
                request = self.waiting.popleft()
                self._admit(request)
                if not request.rows_needed:
                    return  # contrastive search ran a whole generation in this step
                if self.prefilling is None:
                    continue  # it failed alone
            pf = self.prefilling
            before = pf.done
            self._prefill_step(whole=not self.running)
            budget -= max(1, pf.done - before)
            trim_heap(TRIM_GROWTH)  # each prompt's temporaries go back before the next one's
            if self.prefilling is not None:
                return  # a long prompt: its next chunk comes with the next step

    def _fits(self, request: Request) -> bool:
        return self.live_rows + request.rows_needed <= self.max_batch

    def _fail(self, request: Request, error: BaseException, prefill_row: int | None = None) -> None:
        """One request failed (NaN logits, a bad source, a step that raised): it ends alone, and
        its rows are scrubbed (a masked NaN still poisons attention: 0 * NaN)."""
        request.error = f"{type(error).__name__}: {error}"
        if prefill_row is not None:
            self.prefilling = None
            self.cache.clear(prefill_row, scrub=True)
        if request in self.running:
            self._release(request, scrub=True)
        request.finish_all("error")

    def fail_all(self, error: BaseException) -> None:
        """A step failed outside any one request (the batched forward): end what was in flight."""
        if self.prefilling is not None:
            self._fail(self.prefilling.request, error, self.prefilling.row)
        for req in list(self.running):
            self._fail(req, error)

    # ------------------------------------------------------------------ prefill

    def _admit(self, request: Request) -> None:
        if not request.rows_needed:  # contrastive search runs whole, on its own cache
            try:
                request.run_whole(self.dtype, self.device)
            except Exception as e:  # noqa: BLE001
                self._fail(request, e)
            return
        # above every row a decode step touches (nothing decodes while the first one prefills)
        row = _round(self.live_rows, self.cache.min_rows) if self.owner else 0
        # room for the requests already waiting too: growing the cache one request at a time
        # would copy it at every doubling, and the copies briefly hold old and new side by side
        queued = sum(r.rows_needed for r in self.waiting)
        self.cache.reserve(max(row + 1, min(self.max_batch, self.live_rows + request.rows_needed + queued)),
                           1 if self.encoder_decoder else self._first_width(request))
        self.cache.clear(row)
        try:
            self.prefilling = _Prefill(self, request, row)
        except Exception as e:  # noqa: BLE001 - e.g. a source the encoder cannot take
            self._fail(request, e, row)

    def _first_width(self, request: Request) -> int:
        """The columns a decoder-only prompt's first chunk needs (_Prefill.run), so that an empty
        cache is made at that width at once, not made narrow and regrown."""
        n = len(request.prompt)
        return n + _headroom(request) if n <= self.prefill_chunk else self.prefill_chunk

    def _prefill_step(self, whole: bool) -> None:
        pf = self.prefilling
        try:
            logits = pf.run(whole)
        except Exception as e:  # noqa: BLE001
            self._fail(pf.request, e, pf.row)
            return
        if logits is None:
            return
        self.prefilling = None
        req = pf.request
        # the request's rows: the next free ones, each a copy of the prefilled row
        n, first = req.rows_needed, self.live_rows
        self.cache.reserve(first + n, self.cache.lengths[pf.row] + 1)
        self.cache.copy_rows([pf.row] * n, list(range(first, first + n)))
        if pf.row >= first + n:
            self.cache.clear(pf.row)
        req.rows = list(range(first, first + n))
        self.owner.extend([req] * n)
        try:
            req.logits, req.usable = req.begin(logits, pf.decoder_tokens, pf.encoder_tokens), None
        except Exception as e:  # noqa: BLE001
            self.running.append(req)
            self._fail(req, e)
            return
        if req.plain_greedy:  # keep the choice, not the (1, V) logits: 32 prompts read ahead held 6.3 MB
            req.usable, req.greedy = usable_rows(logits)[0], logits.argmax(dim=-1).tolist() * len(req.rows)
            req.logits = None
        self.running.append(req)
        if req.done:
            self._release(req)

    # ------------------------------------------------------------------ decode

    def _decode_step(self) -> None:
        for req in list(self.running):
            try:
                plan = req.advance(req.logits, req.usable)
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)
                continue
            finally:  # the step's logits are freed before the next forward makes new ones
                req.logits = None
            req.next_tokens = plan.tokens
            self._apply(req, plan)
        self._compact()
        if not self.running:
            return
        n = self.live_rows
        self.cache.reserve(n, max(self.cache.lengths[:n]) + 1)
        view = self.cache.step_view(n)
        ids = torch.zeros(view.n, 1, dtype=torch.long)
        pos = torch.zeros(view.n, 1, dtype=torch.long)
        for req in self.running:
            for row, tok in zip(req.rows, req.next_tokens):
                ids[row, 0], pos[row, 0] = tok, self.cache.lengths[row]
        logits = self._step_logits(ids.to(self.device), pos.to(self.device), view, n)
        if logits is None:
            return
        # one check of the step's rows, not one per request (4 small ops each, ~10 ms at 32 rows)
        usable = usable_rows(logits)
        top = None  # one argmax for every greedy request of the step, not one call per request
        for req in self.running:
            rows = req.rows
            if rows == list(range(rows[0], rows[0] + len(rows))):
                req.logits = logits[rows[0]:rows[0] + len(rows)]
            else:
                req.logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            req.usable = all(usable[r] for r in rows)
            if req.plain_greedy:
                top = logits.argmax(dim=-1).tolist() if top is None else top
                req.greedy = [top[r] for r in rows]

    @torch.inference_mode()
    def _step_logits(self, ids: torch.Tensor, pos: torch.Tensor, view, n: int) -> torch.Tensor | None:
        """The step's (n, V) logits; or None when every request takes the plain argmax and the
        head gave it directly (then each request's `greedy` is set and no logits were made)."""
        if self.argmax_head is None or not all(req.plain_greedy for req in self.running):
            return self.model(ids, pos, view, last_only=True)[:n, -1].float()
        hidden = self.model(ids, pos, view, last_only=True, head=False)[:n, -1]
        top, best = self.argmax_head.argmax(hidden)
        if not bool(torch.isfinite(best).all()):  # a NaN or no finite value: the full check finds the rows
            return self.argmax_head(hidden).float()
        top = top.tolist()
        for req in self.running:
            req.logits, req.usable, req.greedy = None, True, [top[r] for r in req.rows]
        return None

    def _apply(self, req: Request, plan) -> None:
        """Carry out a request's plan on its rows: reorder (beams) or free finished ones."""
        keep, rows = plan.keep, req.rows
        if req.done or not keep:
            self._release(req)
            return
        if keep == list(range(len(rows))):
            return
        if len(keep) == len(rows) and sorted(set(keep)) != keep:  # beams copy their parents
            self.cache.copy_rows([rows[p] for p in keep], rows)
            return
        gone = [r for i, r in enumerate(rows) if i not in set(keep)]
        req.rows = [rows[i] for i in keep]
        for r in gone:
            self.cache.clear(r)
            self.owner[r] = None

    def _release(self, req: Request, scrub: bool = False) -> None:
        for r in req.rows:
            self.cache.clear(r, scrub=scrub)
            self.owner[r] = None
        req.rows = []
        if req in self.running:
            self.running.remove(req)
        self._compact()

    def _compact(self) -> None:
        """Move the last live rows into the holes left by freed ones: rows [0, n) stay dense."""
        holes = [r for r, o in enumerate(self.owner) if o is None]
        while holes:
            while self.owner and self.owner[-1] is None:
                self.owner.pop()
            holes = [h for h in holes if h < len(self.owner)]
            if not holes:
                break
            hole, src = holes.pop(0), len(self.owner) - 1
            req = self.owner[src]
            self.cache.copy_rows([src], [hole])
            self.cache.clear(src)
            self.owner[hole] = req
            self.owner.pop()
            req.rows[req.rows.index(src)] = hole


def _headroom(request: Request) -> int:
    """Columns reserved past a prompt for its first new tokens."""
    return min(max(request.max_new, 1), DECODE_HEADROOM)


class _Prefill:
    """A request being read: its prompt in chunks (decoder-only), or its source encoded and the
    decoder's start token run (encoder-decoder), in cache row `row`."""

    def __init__(self, engine: Engine, request: Request, row: int):
        self.engine, self.request, self.row = engine, request, row
        self.done = 0
        self.encoder_tokens = None
        model = engine.model
        if engine.encoder_decoder:
            self.decoder_tokens = [model.decoder_start_token_id]
            self.encoder_tokens = list(request.prompt)
            ids = torch.tensor([request.prompt], device=engine.device)
            mask = torch.ones_like(ids, dtype=torch.bool)
            with torch.inference_mode():
                memory = model.encode(ids, mask)
                tmp = model.make_cache(1, 1, engine.dtype, engine.device, memory=memory, memory_mask=mask)
            engine.cache.set_memory(row, tmp.cross_k, tmp.cross_v, ids.shape[1])
            self.tokens = self.decoder_tokens
        else:
            self.decoder_tokens = self.tokens = list(request.prompt)

    def run(self, whole: bool) -> torch.Tensor | None:
        """Run the next chunk (every chunk if `whole`); the last one returns the logits (1, V)."""
        eng = self.engine
        while self.done < len(self.tokens):
            chunk = self.tokens[self.done:self.done + eng.prefill_chunk]
            last = self.done + len(chunk) >= len(self.tokens)
            eng.cache.reserve(self.row + 1, self.done + len(chunk) + (_headroom(self.request) if last else 0))
            ids = torch.tensor([chunk], device=eng.device)
            pos = torch.arange(self.done, self.done + len(chunk), device=eng.device)[None]
            with torch.inference_mode():
                out = eng.model(ids, pos, eng.cache.row_view(self.row), last_only=True)
            self.done += len(chunk)
            if self.done >= len(self.tokens):
                return out[:, -1].float()
            if not whole:
                return None
        return None
