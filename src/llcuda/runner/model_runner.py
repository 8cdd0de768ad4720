"""Turns a scheduler step into flat tensors, runs the model over the paged KV cache, samples.

One step's batch is the concatenation of every scheduled request's new tokens (prompt chunks and
single decode tokens alike). Attention finds each sequence's past through its block table. A
decode burst (`launch(step, num_steps)`) queues num_steps decode steps at once, each embedding
the tokens the previous one sampled, so the host reads tokens once per burst.
"""

from __future__ import annotations

import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.kv_cache_manager import DEFAULT_DECODE_STEPS, kv_cache_groups
from llcuda.engine.scheduler import SchedulerOutput
from llcuda.kernels.quant_cpu_native import torch_ops_on_one_thread
from llcuda.layers.attention import AttentionMetadata, KVCache
from llcuda.runner.cuda_graphs import DecodeGraphs, PrefillGraphs, pack_step_inputs
from llcuda.runner.logprobs import LogprobRows, TokenLogprob, compute_logprobs, unpack_logprobs
from llcuda.runner.sampler import sample, to_device
from llcuda.structured.bitmask import fill_bitmask


class ModelRunner:
    # launch() handles report SamplingParams.logprobs (SampledTokens.logprobs)
    supports_logprobs = True

    def __init__(
        self,
        model,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        kv_cache_dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.model_config = model_config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.max_blocks_per_seq = engine_config.max_blocks_per_seq
        self.devices = list(dict.fromkeys(model.block_devices))
        self.device = model.head_device  # where logits (and seeded samplers' generators) live
        # full-attention layers and (unless swa_full) sliding-window layers: one block pool each
        self.kv_cache_groups = kv_cache_groups(model_config, engine_config)
        self.num_groups = len(self.kv_cache_groups)
        group_of = {i: g for g, group in enumerate(self.kv_cache_groups) for i in group.layers}
        # On a GPU one extra block per group, owned by no sequence, takes CUDA-graph padding
        # rows' writes.
        self.scratch_blocks = [group.num_blocks for group in self.kv_cache_groups]
        extra = int(self.device.type == "cuda")
        self.kv_caches = [
            KVCache.allocate(
                self.kv_cache_groups[group_of[i]].num_blocks + extra,
                engine_config.block_size,
                model_config.num_kv_heads,
                model_config.head_dim,
                kv_cache_dtype,
                device,
                group=group_of[i],
            )
            for i, device in enumerate(model.block_devices)
        ]
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        single_gpu = self.device.type == "cuda" and all(d == self.device for d in self.devices)
        # Graphs need the fused attention kernel: the reference reads lengths on the host.
        graphable = single_gpu and engine_config.flash_attn is not False
        if graphable and engine_config.extra.get("cuda_graphs", True):
            pool = None
            if engine_config.extra.get("prefill_graphs", True):
                self.prefill_graphs = PrefillGraphs(
                    model,
                    self.kv_caches,
                    max_tokens=min(engine_config.ubatch_size, engine_config.batch_size),
                    max_blocks_per_seq=self.max_blocks_per_seq,
                    max_seq_len=engine_config.ctx_size,
                )
                pool = self.prefill_graphs.capture()
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                max_batch=engine_config.n_parallel,
                max_blocks_per_seq=self.max_blocks_per_seq,
                max_seq_len=engine_config.ctx_size,
                scratch_blocks=self.scratch_blocks,
                block_size=self.block_size,
            )
            self.graphs.capture(pool)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.kv_caches)

    def prepare_inputs(
        self, step: SchedulerOutput, known_ids: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat batch tensors on the CPU: input_ids, positions, metadata, logits_indices.

        known_ids=False: a decode step whose input tokens are still on the device (a chained
        burst, see launch): input_ids are zeros, for the caller to replace.

        Built with list operations and one tensor per field: at a few hundred sequences a step
        the host work here runs between GPU steps, so it is kept to a few microseconds a row.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        # per cache group (full attention, then sliding window if the layers keep two)
        slots: list[list[int]] = [[] for _ in range(self.num_groups)]
        tables: list[list[list[int]]] = [[] for _ in range(self.num_groups)]
        bs = self.block_size
        end = 0
        for item in step.scheduled:
            req, start, n = item.request, item.start_pos, item.num_tokens
            end += n
            if n == 1:  # a decode row
                input_ids.append(req.all_token_ids[start] if known_ids else 0)
                positions.append(start)
            else:
                input_ids.extend(req.all_token_ids[start : start + n])
                positions.extend(range(start, start + n))
            for g in range(self.num_groups):
                table = req.kv_tables[g].blocks
                if n == 1:
                    slots[g].append(table[start // bs] * bs + start % bs)
                else:
                    slots[g].extend([table[p // bs] * bs + p % bs for p in range(start, start + n)])
                tables[g].append(table)
            query_start_loc.append(end)
            seq_lens.append(start + n)
            if item.sample:
                logits_indices.append(end - 1)
        host = self._host_tensor

        def block_tables(group_tables: list[list[int]]) -> torch.Tensor:
            width = max(len(t) for t in group_tables)  # [num_seqs, width] (<= max_blocks_per_seq)
            return host([t + [0] * (width - len(t)) for t in group_tables], torch.int32)

        swa = self.num_groups > 1
        meta = AttentionMetadata(
            slot_mapping=host(slots[0], torch.int64),
            query_start_loc=host(query_start_loc, torch.int32),
            seq_lens=host(seq_lens, torch.int32),
            block_tables=block_tables(tables[0]),
            max_query_len=max(item.num_tokens for item in step.scheduled),
            max_seq_len=max(seq_lens),
            swa_slot_mapping=host(slots[1], torch.int64) if swa else None,
            swa_block_tables=block_tables(tables[1]) if swa else None,
        )
        return (
            host(input_ids, torch.int64),
            host(positions, torch.int64),
            meta,
            host(logits_indices, torch.int64),
        )

    def _host_tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor the GPU copies without blocking: a copy from pageable memory waits for
        the stream to drain first, which would stall a launch queued behind a running burst."""
        t = torch.tensor(data, dtype=dtype)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _prefill_graph_fits(self, step: SchedulerOutput) -> bool:
        """One sequence, several new tokens, and a graph bucket that holds them."""
        return (self.prefill_graphs is not None and len(step.scheduled) == 1
                and step.scheduled[0].num_tokens > 1
                and self.prefill_graphs.bucket_for(step.scheduled[0].num_tokens) is not None)

    @property
    def default_decode_steps(self) -> int:
        """Decode burst length when the config leaves it open: on a GPU with graphs a decode step
        is ~1-3 ms of GPU work after ~0.5 ms of host work; chained steps hide the host. H100,
        1B twin, B=64 decode: 22,817 tok/s at 8 steps a burst, 26,583 at 16."""
        return DEFAULT_DECODE_STEPS if self.graphs is not None else 1

    @property
    def supports_decode_bursts(self) -> bool:
        """Whether launch() can chain decode steps: the whole model on one device."""
        return all(d == self.device for d in self.devices)

    @property
    def supports_chained_bursts(self) -> bool:
        """Whether launch() takes `after`: a burst fed by a running one's tokens on the device,
        which hides the host's work between bursts (the engine chains only with overlap, i.e.
        on a GPU; on the CPU a launch computes before it returns)."""
        return self.supports_decode_bursts

    def execute_model(self, step: SchedulerOutput, num_steps: int = 1) -> dict:
        """Run one step (or a decode burst, see launch); returns the sampled token of each
        request whose known tokens all ran (a list of num_steps tokens for a burst)."""
        return self.launch(step, num_steps).result()

    def launch(self, step: SchedulerOutput, num_steps: int = 1,
               after: SampledTokens | None = None) -> SampledTokens:
        """See _launch; on the CPU its torch ops run on one thread and the matmuls on the
        C++ pool's n_threads (quant_cpu_native.torch_ops_on_one_thread says why)."""
        if self.device.type == "cpu":
            with torch_ops_on_one_thread():
                return self._launch(step, num_steps, after)
        return self._launch(step, num_steps, after)

    @torch.inference_mode()
    def _launch(self, step: SchedulerOutput, num_steps: int = 1,
                after: SampledTokens | None = None) -> SampledTokens:
        """Queue one step on the device; the returned handle waits for its sampled tokens.

        num_steps > 1 (a decode burst: every scheduled request feeds one token and samples, and
        its block table already covers num_steps new positions): that many decode steps, each
        fed the tokens the previous one sampled, all queued before any token reaches the host.
        after: a burst chained behind that still-running burst of the same requests in the same
        order; its input tokens are the last ones `after` sampled, read on the device.
        """
        if not step.scheduled:
            return SampledTokens([], None)
        input_ids, positions, meta, logits_indices = self.prepare_inputs(step, after is None)
        sampled_items = [item for item in step.scheduled if item.sample]
        is_decode = meta.max_query_len == 1 and len(sampled_items) == len(step.scheduled)
        if after is not None:
            if after.last_ids is None or after.last_ids.shape[0] != len(step.scheduled):
                raise ValueError("a chained burst needs the previous burst of the same requests")
            input_ids = after.last_ids
        if num_steps > 1 or after is not None:
            if not (is_decode and self.supports_decode_bursts):
                raise ValueError("a decode burst needs a pure decode step on a one-device model")
            return self._launch_burst(step, num_steps, input_ids, positions, meta)
        x = self.model.embed(input_ids)  # [num_tokens, hidden_size] fp32
        if self.graphs is not None and is_decode and self.graphs.bucket_for(len(sampled_items)):
            logits = self.graphs.run(
                x, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables,
                meta.swa_slot_mapping, meta.swa_block_tables,
            )  # fmt: skip
        elif self._prefill_graph_fits(step):
            swa_table = meta.swa_block_tables[0] if meta.swa_block_tables is not None else None
            logits = self.prefill_graphs.run(
                x, positions, meta.slot_mapping, int(meta.seq_lens[0]), meta.block_tables[0],
                meta.swa_slot_mapping, swa_table,
            )  # fmt: skip
            if not sampled_items:
                return SampledTokens([], None)
        else:
            metas = {device: meta.to(device) for device in self.devices}
            hidden = self.model.forward(x, positions, metas, self.kv_caches)
            if not sampled_items:
                return SampledTokens([], None)
            logits = self.model.compute_logits(hidden[logits_indices.to(hidden.device)])
        return self.sample_requests(logits, [item.request for item in sampled_items])

    def sample_requests(self, logits: torch.Tensor, requests: list) -> SampledTokens:
        """One token per request from its logits row (logits [len(requests), vocab]), under
        each request's grammar mask, with the log-probs of the rows that ask for them."""
        params = [r.sampling_params for r in requests]
        # the forward pass is queued: on a GPU the host fills the grammar masks meanwhile
        bitmask = fill_bitmask([r.grammar for r in requests], logits.device)
        token_ids = sample(
            logits,
            params,
            [r.generator for r in requests],
            [r.all_token_ids for r in requests],
            token_bitmask=bitmask,
        )
        lp_rows = LogprobRows.of(params)
        logprobs = None
        if lp_rows is not None:  # only the rows that asked, from the logits the sampler saw
            logprobs = (lp_rows, compute_logprobs(logits, token_ids, lp_rows))
        return SampledTokens([r.request_id for r in requests], token_ids, logprobs=logprobs)

    def _launch_burst(self, step: SchedulerOutput, num_steps: int, input_ids: torch.Tensor,
                      positions: torch.Tensor, meta: AttentionMetadata) -> SampledTokens:
        requests = [item.request for item in step.scheduled]
        if any(r.grammar is not None for r in requests):
            raise ValueError("a decode burst cannot take a constrained request (structured "
                             "output needs its matcher advanced between steps)")  # fmt: skip
        params = [r.sampling_params for r in requests]
        generators = [r.generator for r in requests]
        # history feeds only the repeat penalty, which the engine keeps out of bursts
        history = [r.all_token_ids for r in requests]
        bs, dev = self.block_size, self.device
        # every step's positions, cache slots and context lengths, known now: [num_steps, B]
        pos = positions[None, :] + torch.arange(num_steps, dtype=torch.int64)[:, None]

        def step_slots(tables: torch.Tensor | None) -> torch.Tensor | None:  # [num_steps, B]
            if tables is None:
                return None
            return tables.long().gather(1, (pos // bs).T).T * bs + pos % bs

        slots, swa_slots = step_slots(meta.block_tables), step_slots(meta.swa_block_tables)
        lens = pos + 1
        use_graph = self.graphs is not None and self.graphs.bucket_for(len(requests)) is not None
        tokens: list[torch.Tensor] = []  # [B] per step, stacked once at the end
        # rows that report log-probs: computed from each step's logits, like its sample
        lp_rows = LogprobRows.of(params)
        lp_steps: list[torch.Tensor] = []  # [num_rows, 1 + 2k] per step

        def sample_step(logits: torch.Tensor) -> torch.Tensor:
            ids = sample(logits, params, generators, history)
            if lp_rows is not None:
                lp_steps.append(compute_logprobs(logits, ids, lp_rows))
            return ids

        def sampled(ids: torch.Tensor) -> SampledTokens:
            logprobs = None if lp_rows is None else (lp_rows, torch.stack(lp_steps))
            return SampledTokens([r.request_id for r in requests], torch.stack(tokens), ids,
                                 logprobs=logprobs)  # fmt: skip

        ids = input_ids
        if use_graph:
            # per step: the embedding gather into the graph's input, one copy, the replay and
            # the sampler: the block tables stay put for the whole burst (its blocks reserved)
            graphs = self.graphs
            graphs.prepare(len(requests), meta.block_tables, meta.swa_block_tables)
            # [num_steps, 3 or 4, B]
            step_inputs = to_device(pack_step_inputs(pos, slots, lens, swa_slots), dev)
            for j in range(num_steps):
                self.model.embed(ids, out=graphs.x[: len(requests)])
                ids = sample_step(graphs.replay(step_inputs[j]))
                tokens.append(ids)
            return sampled(ids)
        pos, slots, lens, tables, starts, swa_slots, swa_tables = (
            to_device(t, dev) if t is not None else None
            for t in (pos, slots, lens.to(torch.int32), meta.block_tables, meta.query_start_loc,
                      swa_slots, meta.swa_block_tables)
        )  # fmt: skip
        for j in range(num_steps):
            step_meta = AttentionMetadata(
                slot_mapping=slots[j], query_start_loc=starts, seq_lens=lens[j],
                block_tables=tables, max_query_len=1, max_seq_len=meta.max_seq_len + j,
                swa_slot_mapping=swa_slots[j] if swa_slots is not None else None,
                swa_block_tables=swa_tables,
            )  # fmt: skip
            hidden = self.model.forward(self.model.embed(ids), pos[j], {dev: step_meta},
                                        self.kv_caches)  # fmt: skip
            ids = sample_step(self.model.compute_logits(hidden))
            tokens.append(ids)
        return sampled(ids)


class SampledTokens:
    """The token ids one step sampled, on their way to the host.

    On a GPU the copy goes to pinned memory without blocking and an event marks its end, so the
    caller can do host work while the step runs; result() waits for that event only.
    """

    def __init__(self, request_ids: list[str], token_ids: torch.Tensor | None,
                 last_ids: torch.Tensor | None = None,
                 logprobs: tuple[LogprobRows, torch.Tensor] | None = None):  # fmt: skip
        self.request_ids = request_ids
        self.event = None
        # the rows that asked for log-probs and their packed values ([num_rows, W], a burst's
        # [num_steps, num_rows, W]: runner/logprobs.py), copied to the host with the tokens
        self._logprob_rows = logprobs[0] if logprobs is not None else None
        self._logprobs = logprobs[1] if logprobs is not None else None
        # [B] on the device, the last step's tokens: what a chained burst feeds (launch's
        # `after`). A burst passes its last step's own tensor: a row view into the stacked
        # [num_steps, B] may sit at an offset that makes Triton compile the embedding again.
        self.last_ids = last_ids if last_ids is not None else token_ids
        if token_ids is not None and token_ids.device.type == "cuda":
            self.token_ids = _to_pinned_host(token_ids)
            if self._logprobs is not None:  # one more copy before the same event
                self._logprobs = _to_pinned_host(self._logprobs)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.token_ids = token_ids

    def result(self) -> dict:
        """{request_id: token id}, or {request_id: [token ids]} for a decode burst."""
        if self.token_ids is None:
            return {}
        if self.event is not None:
            self.event.synchronize()
        # a burst's tokens are [num_steps, B]: one list per request, in step order
        rows = self.token_ids.T.tolist() if self.token_ids.dim() == 2 else self.token_ids.tolist()
        return dict(zip(self.request_ids, rows, strict=True))

    def logprobs(self) -> dict[str, list[TokenLogprob]]:
        """After result(): {request_id: [one TokenLogprob per step]} for the rows that asked
        (a burst's steps in order); {} when none did."""
        if self._logprob_rows is None or self.token_ids is None:
            return {}
        if self.event is not None:
            self.event.synchronize()  # a no-op after result(): the same event
        payload, tokens = self._logprobs.tolist(), self.token_ids.tolist()
        if self.token_ids.dim() == 1:  # one step: as a burst of one
            payload, tokens = [payload], [tokens]
        return unpack_logprobs(payload, tokens, self._logprob_rows, self.request_ids)


def _to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of device tensor `t`, queued on the stream (not waited for)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
