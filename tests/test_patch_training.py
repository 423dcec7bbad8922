"""A patched model where people train it (tiny random Llama, fp32, CPU or GPU): transformers' Trainer with its
default arguments, PEFT/LoRA patched before or after wrapping, gradient checkpointing, TRL's SFTTrainer, and
DDP / FSDP2 over two processes. Each gives the unpatched model's losses and gradients."""
import importlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import triformer
from tests.helpers.hf import DEVICE, VOCAB, count_patch_calls, lm_batch, pair
from triformer.testing import FP32_RTOL, rel_error

transformers = pytest.importorskip("transformers")
# the MLP runs as glu_linear while its down_proj is a plain nn.Linear
BACKBONE = ("_attention", "apply_rope", "rms_norm", "glu_linear")
# ... and as swiglu then down_proj's own call once that is wrapped (LoRA, accelerate's hooks)
WRAPPED_BACKBONE = ("_attention", "apply_rope", "rms_norm", "swiglu")


@pytest.fixture
def calls(monkeypatch):
    return count_patch_calls(monkeypatch, BACKBONE + ("swiglu", "linear_cross_entropy"))


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(t),), generator=g).tolist() for t in torch.randint(3, 10, (n,), generator=g)]


def _pad(features):
    """Right-pads a list of {"input_ids": [...]} into input_ids, attention_mask and labels (-100 on padding)."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _args(cls, tmp_path, **extra):
    # every other argument at its default: remove_unused_columns=True drops the unused "text" column and keeps
    # the forward's own ones, found from its signature
    return cls(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
               logging_steps=1, report_to=[], use_cpu=DEVICE.type == "cpu", save_strategy="no", learning_rate=1e-2,
               disable_tqdm=True, **extra)


def test_trainer_default_arguments_grad_accumulation_padded(tmp_path, calls):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    data = datasets.Dataset.from_dict({"input_ids": _rows(), "text": ["unused"] * 8})
    ref, patched = pair("llama")
    triformer.patch(patched)
    want = _losses(transformers.Trainer(model=ref, args=_args(transformers.TrainingArguments, tmp_path / "a"),
                                        train_dataset=data, data_collator=_pad))
    got = _losses(transformers.Trainer(model=patched, args=_args(transformers.TrainingArguments, tmp_path / "b"),
                                       train_dataset=data, data_collator=_pad))
    assert len(got) == 2 and got == pytest.approx(want, rel=FP32_RTOL)
    assert calls["linear_cross_entropy"] == 4  # 2 steps x 2 micro-batches
    for name in BACKBONE:
        assert calls[name] > 0


def test_sft_trainer_runs_the_patched_backbone(tmp_path, calls):
    """TRL's SFTTrainer (since it has ``add_fused_lm_head``) replaces the model's forward by its own fused LM head
    (per-token log-probabilities, entropy and accuracy, chunked: it never builds the logits either) and computes
    the loss from that: the triformer kernels run in the backbone, TRL's chunked head runs the loss. Older TRL
    calls the model with labels, which runs triformer's fused loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", bos_token="t1",
                                                     eos_token="t2", unk_token="t3")
    data = datasets.Dataset.from_dict({"input_ids": _rows()})
    ref, patched = pair("llama")
    triformer.patch(patched)
    losses = []
    for model, out in ((ref, "a"), (patched, "b")):
        # bf16=False: TRL turns it on where the CPU supports it, and bf16 under Triton's interpreter is wrong
        args = _args(trl.SFTConfig, tmp_path / out, bf16=False, max_length=16)
        losses.append(_losses(trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)))
    assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], rel=FP32_RTOL)
    trl_head = hasattr(importlib.import_module("trl.trainer.utils"), "add_fused_lm_head")
    assert (calls["linear_cross_entropy"] == 0) == trl_head
    for name in BACKBONE:
        assert calls[name] > 0


@pytest.mark.parametrize("order", ["patch then wrap", "wrap then patch"])
def test_peft_lora(calls, order):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)  # random B: every LoRA weight gets a gradient
    ref, patched = pair("llama")
    torch.manual_seed(1)
    ref = peft.get_peft_model(ref, config)
    torch.manual_seed(1)
    if order == "patch then wrap":
        report = triformer.patch(patched)
        patched = peft.get_peft_model(patched, config)
    else:
        patched = peft.get_peft_model(patched, config)
        report = triformer.patch(patched)
    assert report.parts() == {"attention": 2, "rope": 2, "mlp": 2, "norm": 5, "loss": 1} and not report.left_alone
    ids, mask, labels = lm_batch()
    ref.train(), patched.train()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_error(got, want) <= FP32_RTOL
    want.backward()
    got.backward()
    trained = [(n, p, q) for (n, p), q in zip(ref.named_parameters(), patched.parameters()) if p.requires_grad]
    assert len(trained) == 16  # A and B of 4 targets x 2 layers
    for name, p, q in trained:
        assert rel_error(q.grad, p.grad) <= FP32_RTOL, name
    for name in WRAPPED_BACKBONE + ("linear_cross_entropy",):  # down_proj is a LoRA target
        assert calls[name] > 0


def test_gradient_checkpointing(calls):
    ref, patched = pair("llama")
    triformer.patch(patched)
    ids, mask, labels = lm_batch()
    for model in (ref, patched):
        model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), patched.parameters()):
        assert rel_error(q.grad, p.grad) <= FP32_RTOL, name
    assert calls["rms_norm"] == 5 + 4  # the layers' norms ran twice: forward, then recomputed in the backward


def test_accelerate_hooks_keep_the_patch(calls):
    """A model dispatched by accelerate (``device_map=...`` puts a hook on every module, which calls the forward
    it captured) runs the swapped forwards all the same."""
    hooks = pytest.importorskip("accelerate.hooks")
    ref, patched = pair("llama")
    for module in patched.modules():
        hooks.add_hook_to_module(module, hooks.ModelHook())
    triformer.patch(patched)
    ids, mask, labels = lm_batch()
    ref.train(), patched.train()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_error(patched(input_ids=ids, attention_mask=mask, labels=labels).loss, want) <= FP32_RTOL
    for name in WRAPPED_BACKBONE + ("linear_cross_entropy",):
        assert calls[name] > 0, name


# --- two processes on the CPU (gloo): DDP and FSDP2 give one process's losses ---

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_steps(model, ids, labels, steps=2):
    """Losses of ``steps`` SGD steps on (ids, labels) (no padding: each rank's mean is over as many tokens)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _rank(rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard
        ids, _, labels = lm_batch(B=4, padding="none")
        for strategy in ("ddp", "fsdp2"):
            _, model = pair("llama")
            triformer.patch(model)  # before wrapping or sharding: the probes read the full weights
            model.train()
            if strategy == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            else:
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
            losses = _train_steps(model, ids[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2])
            for loss in losses:
                torch.distributed.all_reduce(loss)
            queue.put((strategy, rank, [float(x) / 2 for x in losses]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="gloo on the CPU")
def test_ddp_and_fsdp2_two_processes_match_one():
    """Each rank trains on half the batch (no padding: every rank's mean loss is over as many tokens); the mean
    of the two ranks' losses is one process's loss on the whole batch, step after step."""
    _, model = pair("llama")
    triformer.patch(model)
    ids, _, labels = lm_batch(B=4, padding="none")
    want = [float(x) for x in _train_steps(model.train(), ids, labels)]
    queue = mp.get_context("forkserver").SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), queue), nprocs=2, start_method="forkserver")
    results = [queue.get() for _ in range(4)]
    assert sorted((strategy, rank) for strategy, rank, _ in results) == [
        ("ddp", 0), ("ddp", 1), ("fsdp2", 0), ("fsdp2", 1)]
    for strategy, rank, losses in results:
        assert losses == pytest.approx(want, rel=FP32_RTOL), (strategy, rank, losses, want)
