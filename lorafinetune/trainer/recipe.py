"""The LoRA fine-tuning recipe each rank runs: setup -> train (with evaluate and checkpoint) -> save_adapter.

Every rank executes the same sequence of collective calls; comments mark the ones all ranks must reach together.
Rank 0 alone publishes progress, metrics, the adapter and the summary (`self.is_main`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import AdapterRef
from lorafinetune.api.uris import StorageURI
from lorafinetune.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    ENV_LOSS_CHUNK,
    ENV_METRICS_PORT,
    LOSS_PLOT_FILE,
    MERGED_DIR,
    ExitCode,
    MergedModel,
)
from lorafinetune.plan import PlanError
from lorafinetune.plots import plot_loss_curves
from lorafinetune.trainer import (
    attention,
    batching,
    checkpoint,
    compiled,
    data,
    engine,
    fence,
    lora_linear,
    model,
    output,
    remote,
    summary,
)
from lorafinetune.trainer.errors import ConfigError, DataError, TrainerError
from lorafinetune.trainer.fingerprint import spec_fingerprint
from lorafinetune.trainer.loss import CHUNK_ELEMENTS, TokenLoss
from lorafinetune.trainer.report import Reporter
from lorafinetune.trainer.state import TrainState


class Interrupted(TrainerError):
    """Stopped on SIGINT/SIGTERM after writing a checkpoint."""

    exit_code = ExitCode.INTERRUPTED


class LoRAFineTuneRecipe:
    def __init__(self, name: str, spec: LoRAFineTuneSpec, run_dir: Path):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on_gpu = spec.resources.gpus_per_node > 0 and torch.cuda.is_available()
        # training.precision auto: this device's choice (__main__ resolves it first, for the published adapter's check)
        self.written_precision = spec.training.precision
        spec = model.with_concrete_precision(spec, self.on_gpu, self.local_rank)
        self.name, self.spec, self.run_dir = name, spec, run_dir
        self.is_main = self.rank == 0
        # The folder's leader creates, renames and prunes checkpoints in it: one per node with per-node scratch.
        self.run_dir_leader = self.local_rank == 0 if spec.output.per_node_scratch else self.is_main
        self.stop_requested = False
        self.state = TrainState()
        self.report = Reporter(run_dir, active=self.is_main)
        self.after_step: list[Callable[[int], None]] = []  # called with each step done (tests inject faults here)
        self.attempt = fence.token()  # see fence.py: a newer attempt's claim stops this one from publishing

    def superseded(self) -> fence.Superseded | None:
        """The newer attempt that took the run folder over, if one did. A rank of an older attempt that was paused
        between a claim check and the write it guarded (os.replace into a staging folder the newer attempt has since
        removed, say) fails with an I/O error whose real cause is this."""
        try:
            fence.check(self.run_dir, self.attempt, "going on")
            if getattr(self, "mirror", None) is not None:  # set in setup(), which may not have got that far
                self.mirror.check(self.attempt, "going on")
        except fence.Superseded as err:
            # No claim at all is no evidence of a newer attempt: this one may have failed before claiming
            return err if err.holder is not None else None
        except (TrainerError, OSError):
            pass  # the claim could not be read: no evidence either
        return None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        spec = self.spec
        if spec.resources.gpus_per_node > 0 and not torch.cuda.is_available():
            raise ConfigError(
                f"resources.gpusPerNode is {spec.resources.gpus_per_node} but no CUDA device is visible; "
                f"set gpusPerNode: 0 to train on CPU"
            )
        if self.on_gpu:
            torch.cuda.set_device(self.local_rank)
        if self.run_dir_leader:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fence.claim(self.run_dir, self.attempt)  # from now on, older attempts write nothing here
        # Before any collective: fetch inputs and, in a new pod, the newest checkpoint from S3 (file-locked).
        self.mirror = remote.OutputMirror(spec, self.run_dir)
        if self.is_main:
            self.mirror.claim(self.attempt)  # an s3:// output too: older attempts write nothing there from now on
        pulled = self.mirror.pull_latest_checkpoint()
        if pulled:  # whichever local rank took the lock first
            print(f"fetched checkpoint {pulled} from {spec.output.uri}", flush=True)
        downloaded = (
            remote.fetch_input(spec, spec.model.uri, model.cache_dir(), is_model=True)
            if spec.model.uri.scheme == "s3"
            else None
        )
        # GGUF conversion (file-locked, written by whichever local rank gets there first) also comes before the
        # process group: transformers only writes weights on rank 0 once one exists.
        self.model_dir = model.resolve_model_dir(spec.model, downloaded)
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", verbose=False)
        if self.written_precision == "auto":  # a written one is the same on every rank: nothing to gather
            self._check_same_precision()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)

        # 1. Tokenizer and data first: every rank tokenises on its own, before the next collective.
        uri = spec.model.uri
        self.model_revision = self._pinned_hub_commit(uri) if uri.scheme == "hf" and not spec.model.gguf_file else None
        revision = self.model_revision
        self.tokenizer = model.load_tokenizer(self.model_dir, spec.model, revision)
        self._load_data()

        # 2. Model + LoRA, seeded identically on every rank (DeepSpeed also broadcasts rank 0's weights).
        torch.manual_seed(spec.training.seed)
        dtype = model.load_dtype(spec.model, spec.training.precision)
        device = torch.device("cuda", self.local_rank) if self.on_gpu else torch.device("cpu")
        if not self.on_gpu and self.is_main and (slow := model.emulated_on_cpu(spec.model, spec.training.precision)):
            print(f"warning: {slow}", flush=True)
        base = model.load_base_model(self.model_dir, spec.model, dtype, revision, quantized_on=device)
        self.attention = self._use_attention(base, device, dtype)
        self.share_prefix = self._prefix_sharing(attention.config_of(base.config))
        self.quantized_layers = sum(1 for m in base.modules() if type(m).__name__ in model.QUANTIZED_LINEARS)
        self.peft_model = model.wrap_with_lora(base, spec.lora, spec.training.gradient_checkpointing)
        if spec.deepspeed.zero_stage < 3:  # ZeRO-3 gathers weights in each module's own call
            # A GPU keeps each layer's dropped-out input (no extra pass in backward); a CPU, whose resident set is
            # mostly activations, keeps the shared inputs and redoes the dropout (lora_linear.py).
            fused = lora_linear.fuse_lora_linears(self.peft_model, keep_dropped=self.on_gpu)
            if self.is_main:
                print(f"LoRA layers: {fused} with the fused forward (lora_linear.py)", flush=True)
        if layers := compiled.compile_decoder_layers(self.peft_model, spec.deepspeed.zero_stage):  # experimental
            if self.is_main:
                print(f"decoder layers: {layers} compiled ({compiled.ENV_COMPILE}={compiled.LAYERS})", flush=True)
        chunk = int(os.environ.get(ENV_LOSS_CHUNK) or CHUNK_ELEMENTS)
        self.token_loss = TokenLoss(self.peft_model, chunk, partitioned=spec.deepspeed.zero_stage == 3)
        self.adapted_modules = sum(1 for n, _ in self.peft_model.named_modules() if n.endswith("lora_A.default"))
        # PEFT's count: a 4-bit tensor packs two weights per element
        self.trainable, self.total_params = self.peft_model.get_nb_trainable_parameters()

        # 3. DeepSpeed engine (collective: all ranks).
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        optimizer = engine.make_optimizer(params, spec, self.on_gpu)
        scheduler = engine.make_scheduler(optimizer, spec, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.peft_model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=engine.deepspeed_config(spec, self.world, self.on_gpu, self.trainable),
        )
        self.device = self.engine.device
        self.compute_dtype = next(p.dtype for p in self.engine.module.parameters() if not p.requires_grad)

        # 4. Resume from the newest complete checkpoint, if any (collective load).
        self.start_step = 0
        try:
            last = checkpoint.latest_checkpoint(
                self.run_dir, self.world, self.fingerprint, spec, self.written_precision
            )
            problem = None
        except TrainerError as err:  # raised after the collective below, so that no rank is left waiting in it
            last, problem = None, err
        # Collective: with per-node run folders each node picked its own checkpoint; they must be the same step.
        step_seen = last.step if last else -1
        steps = torch.tensor([step_seen, -step_seen, int(problem is not None)], device=self.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if problem is not None:
            raise problem
        if steps[2].item():
            raise TrainerError("another rank could not use its checkpoints (its log says why)")
        if steps[0].item() != -steps[1].item():
            raise TrainerError(
                f"nodes found different newest checkpoints (steps {-steps[1].item()} to {steps[0].item()}) in their "
                f"run folders; remove the newer ones from {self.run_dir / CHECKPOINTS_DIR} or start a fresh output"
            )
        if last is not None:
            checkpoint.load(self.engine, last, self.rank)
            self.start_step = last.step
            self.state = TrainState.from_meta(last.meta)
            self.report.resumed(last.step, last.path)
        # Per-rank dropout streams, distinct across ranks; restored exactly from the checkpoint on resume.
        if last is None:
            seed = spec.training.seed + 1000 * (self.rank + 1)
            random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)

        port = int(os.environ.get(ENV_METRICS_PORT, "0") or 0)
        self.report.started(self.schedule, self.total_steps, self.start_step, spec.model.uri, self.world,
                            spec.training.precision, port)

    def _check_same_precision(self) -> None:
        """training.precision auto is resolved by each rank for its own device; ranks on different GPUs or CPUs
        may resolve it differently, and DeepSpeed cannot reduce gradients across two precisions."""
        chosen: list[str | None] = [None] * self.world
        dist.all_gather_object(chosen, self.spec.training.precision)
        if len(set(chosen)) > 1:
            by_rank = ", ".join(f"rank {r}: {p}" for r, p in enumerate(chosen))
            raise ConfigError(
                f"training.precision auto picks different precisions on different ranks ({by_rank}): their GPUs "
                f"or CPUs differ. Set training.precision to one of them, or select alike nodes with "
                f"resources.nodeSelector"
            )

    def _data_path(self, uri: StorageURI) -> Path:
        return remote.fetch_input(self.spec, uri, model.cache_dir(), is_model=False)

    def _load_data(self) -> None:
        ds, t = self.spec.dataset, self.spec.training
        fmt = data.Formatter(self.tokenizer, ds.format, ds.max_seq_length, ds.train_on_prompt)
        self.train_path = self._data_path(ds.train)
        examples = data.load_examples(self.train_path, fmt)
        self.val_path = self._data_path(ds.validation) if ds.validation else None
        if self.val_path is not None:
            train, val = examples, data.load_examples(self.val_path, fmt)
        else:
            train, val = data.split_validation(examples, ds.effective_validation_split, t.seed)
        self.train_examples, self.val_examples = train, val
        self.train_units = batching.make_units(train, ds.max_seq_length, ds.packing)
        self.val_units = batching.make_units(val, ds.max_seq_length, packing=False)
        self.schedule = batching.Schedule(
            len(self.train_units), t.micro_batch_size, t.gradient_accumulation_steps, self.world, t.seed
        )
        if self.schedule.steps_per_epoch == 0:
            raise DataError(
                f"{self.train_path}: {len(self.train_units)} training rows are fewer than one global batch "
                f"({self.schedule.global_batch} = microBatchSize x gradientAccumulationSteps x {self.world} "
                f"processes); add data or lower the batch settings"
            )
        self.total_steps = self.schedule.total_steps(t.epochs, t.max_steps)
        self.fingerprint = {**spec_fingerprint(self.spec), "trainData": output.sha256_of(self.train_path)[:16]}

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self.stop_requested = True  # acted on at the next step boundary, by all ranks together

    # ---------------------------------------------------------------- train
    def _use_attention(self, base: Any, device: torch.device, dtype: torch.dtype) -> str:
        """Varlen attention where it can run, SDPA in fp32 on a CPU in half precision (see attention.py), else SDPA
        with masks; logged either way."""
        chosen, why = attention.choose(device, dtype, attention.config_of(base.config))
        if chosen != attention.SDPA:
            attention.register(chosen)
            base.set_attn_implementation(chosen)
            if base.config._attn_implementation != chosen:  # a model that cannot switch: SDPA, as before
                chosen, why = attention.SDPA, f"{type(base).__name__} cannot switch its attention implementation"
        if self.is_main:
            print(f"attention: {chosen} ({why})", flush=True)
        return chosen

    def _prefix_sharing(self, config: dict[str, Any]) -> float | None:
        """The model's attention_pairs_per_token where micro-batches may share their first tokens (batching.py),
        None where they may not; logged either way."""
        ds, why = self.spec.dataset, ""
        if not ds.share_prefix:
            why = "dataset.sharePrefix is false"
        elif ds.packing:
            why = "packed rows"
        elif self.attention == attention.VARLEN:
            why = "varlen attention takes no tree-shaped mask"
        elif plain := attention.not_plain_attention(config):
            why = f"the model's attention has {plain}, which a mask of ours would leave out"
        else:
            try:
                pairs = batching.attention_pairs_per_token(config)
            except PlanError as err:
                why = str(err)
        if self.is_main:
            print(f"prefix sharing: {f'off ({why})' if why else 'on where a micro-batch begins alike'}", flush=True)
        return None if why else pairs

    def _collate(self, units: list[batching.Unit], packing: bool) -> dict[str, Any]:
        varlen = self.attention == attention.VARLEN
        return batching.collate(units, self.tokenizer.pad_token_id, packing, varlen, self.share_prefix)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = out.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # additive packing mask must match the compute dtype
            out["attention_mask"] = mask.to(self.compute_dtype)
        return out

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token loss of a batch (normalised later by the global token count)."""
        return self.token_loss(self.engine, batch)

    def train(self) -> None:
        spec, sched = self.spec, self.schedule
        accum = spec.training.gradient_accumulation_steps
        if self.start_step == 0 and self.val_units:
            self.evaluate(step=0)
        self.engine.train()
        step = self.start_step
        # Resumed from the checkpoint of the step early stopping ended on (publishing failed after it): done.
        while step < self.total_steps and not (step and self._early_stop()):
            t0 = time.perf_counter()
            units = [[self.train_units[i] for i in sched.micro_batch(step, k, self.rank)] for k in range(accum)]
            micro = [self._to_device(self._collate(u, spec.dataset.packing)) for u in units]
            # Collective: the global count of trained tokens in this optimizer step normalises the loss, so
            # batch 8 x accum 1 equals batch 1 x accum 8 and ranks with more tokens weigh more.
            counts = torch.tensor(
                [sum(batching.trained_token_count(b) for b in micro), sum(x.length for u in units for x in u),
                 sum(b["input_ids"].numel() for b in micro)],
                dtype=torch.float64,
                device=self.device,
            )  # fmt: skip
            dist.all_reduce(counts)
            global_tokens, input_tokens, computed_tokens = counts.tolist()
            loss_total = 0.0
            for b in micro:
                loss_sum = self._loss_sum(b)
                # DeepSpeed averages gradients over ranks, hence the world factor; GAS scaling is ours.
                self.engine.backward(loss_sum * (self.world / global_tokens), scale_wrt_gas=False)
                self.engine.step()
                loss_total += loss_sum.item()
            step += 1
            # Collective: summed loss for reporting, and the stop flag so that all ranks stop at the same step.
            stats = torch.tensor([loss_total, float(self.stop_requested)], device=self.device, dtype=torch.float64)
            dist.all_reduce(stats)
            train_loss, stop = stats[0].item() / global_tokens, stats[1].item() > 0
            seconds, lr = time.perf_counter() - t0, self.engine.get_lr()[0]
            self.state.record_step(step, train_loss, lr, int(global_tokens), int(input_tokens), seconds,
                                   int(computed_tokens))  # fmt: skip
            self.report.stepped(step, self.state, train_loss, lr, global_tokens, input_tokens, seconds)

            evaluated = False
            if self.val_units and (step % spec.evaluation.every_steps == 0 or step == self.total_steps):
                self.evaluate(step)
                evaluated = True
            # The last step is checkpointed too: a failure while verifying or publishing the adapter then resumes
            # there instead of replaying the tail of training. So is the step early stopping ends on.
            early_stop = evaluated and self._early_stop()
            if step % spec.checkpointing.every_steps == 0 or step == self.total_steps or stop or early_stop:
                self.save_checkpoint(step)
            for hook in self.after_step:
                hook(step)
            if stop and step < self.total_steps:
                raise Interrupted(f"stopped at step {step} on request; checkpoint saved, run again to resume")
            if early_stop:
                self.report.stopped_early(step, self.state.evals_without_gain)
                break
        self.steps_done = step

    # ---------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Mean loss per token on the held-out set. Every rank runs the same number of forward passes (ZeRO-3
        gathers parameters collectively in forward); ranks with nothing left run a fully masked batch."""
        micro = self.spec.training.micro_batch_size
        per_round = micro * self.world
        rounds = math.ceil(len(self.val_units) / per_round)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.engine.eval()
        for r in range(rounds):
            start = r * per_round + self.rank * micro
            units = self.val_units[start : start + micro]
            batch = self._collate(units or self.val_units[:1], packing=False)
            if not units:
                batch["labels"].fill_(data.IGNORE)
            batch = self._to_device(batch)
            total[0] += self._loss_sum(batch).double()
            total[1] += batching.trained_token_count(batch)
        self.engine.train()
        dist.all_reduce(total)  # collective: sum of losses and token counts over ranks
        loss = (total[0] / total[1]).item()
        es = self.spec.evaluation.early_stopping
        self.state.record_eval(step, loss, min_delta=es.min_delta if es else 0.0)
        self.report.evaluated(step, loss)
        return loss

    def _early_stop(self) -> bool:
        es = self.spec.evaluation.early_stopping
        return es is not None and self.state.evals_without_gain >= es.patience

    def _pinned_hub_commit(self, uri: StorageURI) -> str:
        """The commit of an hf:// model that every rank loads: a commit in the URI; else the one the newest
        checkpoint was trained on (a retry must not load what the branch names now); else what the branch names now.
        Rank 0 decides and tells the others (each asking the Hub could straddle a push)."""
        decided: list[Any] = [None]
        if self.is_main:
            try:
                done = checkpoint.complete_checkpoints(self.run_dir)
                pinned = done[-1].meta.get("modelRevision") if done and not uri.revision else None
                decided[0] = pinned or model.hub_commit(uri.location, uri.revision)
            except TrainerError as err:  # passed on, so that no rank waits for a commit that never comes
                decided[0] = err
        dist.broadcast_object_list(decided, src=0)
        if isinstance(decided[0], Exception):
            raise decided[0]
        return decided[0]

    # ---------------------------------------------------------------- checkpoint and output
    def _meta(self) -> dict[str, Any]:
        return {
            "worldSize": self.world,
            "precision": self.spec.training.precision,
            "writtenPrecision": self.written_precision,  # auto's choice is not the user's (fingerprint.py)
            "fingerprint": self.fingerprint,
            "modelRevision": self.model_revision,
            **self.state.to_meta(),
        }

    def save_checkpoint(self, step: int) -> None:
        keep_last = self.spec.checkpointing.keep_last
        path = checkpoint.save(self.engine, self.run_dir, step, self.rank, self._meta(), keep_last, self.run_dir_leader,
                               self.attempt)  # fmt: skip
        relative = f"{CHECKPOINTS_DIR}/{path.name}"
        if self.mirror.remote and self.spec.resources.nodes > 1:
            self._mirror_multi_node(path, relative)
        elif self.is_main:
            self.mirror.check(self.attempt, f"mirroring {relative}")
            self.mirror.push(path, relative)  # single node: rank 0's folder has every shard
        if self.is_main:
            self.mirror.check(self.attempt, "pruning checkpoints")
            self.report.checkpointed(step, path, self.mirror.prune_checkpoints(keep_last))

    def _mirror_multi_node(self, path: Path, relative: str) -> None:
        """Each node's leader uploads its own shards; then rank 0 marks the S3 checkpoint complete. Every rank calls
        this (collective); an upload error is raised after the collective, so no rank is left waiting in it."""
        failure: TrainerError | None = None
        if self.run_dir_leader:
            try:
                self.mirror.push_shards(path, relative)
            except TrainerError as err:
                failure = err
        # Collective and sync point: every node's shards are in S3 before rank 0 marks the checkpoint complete.
        failed = torch.tensor([int(failure is not None)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failure is not None:
            raise failure
        if failed.item():
            raise TrainerError(f"another node could not upload its part of {relative} (its log says why)")
        if self.is_main:
            self.mirror.check(self.attempt, f"completing {relative}")
            self.mirror.mark_complete(path, relative)

    def save_adapter(self, started: float) -> AdapterRef | None:
        """Gather the LoRA weights (collective under ZeRO-3), then rank 0 writes, verifies and publishes."""
        import deepspeed

        staging = output.staging_dir(self.run_dir)
        trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        gather = (
            deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
            if self.spec.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:  # collective under ZeRO-3: every rank enters, rank 0 writes
            if self.is_main:
                fence.check(self.run_dir, self.attempt, "writing the adapter")  # the staging folder is shared
                shutil.rmtree(staging, ignore_errors=True)
                self.engine.module.save_pretrained(staging)
                self.tokenizer.save_pretrained(staging)
        # The last collective: the other ranks leave now instead of waiting in a barrier (with its timeout) while
        # rank 0 reloads the base model to verify the adapter, which can take minutes for a large model.
        self.cleanup()
        if not self.is_main:
            return None
        count = output.check_tensors(staging, self.adapted_modules, self.spec.lora.use_dora)
        merge_into = output.merged_staging_dir(self.run_dir) if self.spec.output.merge_adapter else None
        merge_dtype = str(model.load_dtype(self.spec.model, self.spec.training.precision)).removeprefix("torch.")
        output.verify_in_fresh_process(staging, self.model_dir, self.model_revision, merge_into, merge_dtype)
        try:
            plot_loss_curves(self.state.history, staging / LOSS_PLOT_FILE, f"{self.name}: loss per trained token")
        except ImportError as err:  # a picture is not worth failing a finished run over (an image without matplotlib)
            print(f"no {LOSS_PLOT_FILE}: {err}", flush=True)
        merged = MergedModel(uri=self._published_uri(MERGED_DIR), dtype=merge_dtype) if merge_into else None
        adapter = output.adapter_ref(staging, self._published_uri(ADAPTER_DIR), self.model_revision,
                                     merged.uri if merged else None)  # fmt: skip
        record = summary.training_summary(self, adapter, count, merged, started)
        output.publish(self.run_dir, record, summary.model_card(record), self.fingerprint, self.attempt,
                       self.written_precision)
        if self.mirror.remote:
            self.mirror.check(self.attempt, "publishing the adapter")
            if merged:
                self.mirror.push(self.run_dir / MERGED_DIR, MERGED_DIR)
            self.mirror.push(self.run_dir / ADAPTER_DIR, ADAPTER_DIR)  # COMPLETE.json last: never seen half-written
        self.report.finished(self.steps_done, self.state)
        return adapter

    def _published_uri(self, folder: str) -> str:
        return f"{self.mirror.remote}/{folder}" if self.mirror.remote else str(self.run_dir / folder)

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.barrier()  # a rank leaving early can abort the others at exit
            dist.destroy_process_group()
