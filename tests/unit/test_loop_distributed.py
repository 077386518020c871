"""The shared step loop (rayapp.training.loop.fit) on 2 CPU processes over gloo with FSDP2, against one
process: the same losses and validation loss with an uneven validation split (3 items on one rank, 2
on the other: every forward under FSDP2 is a collective, so ranks pad to the same number), a
sharded checkpoint written by both ranks and resumed by a new pair, and export_model of a LoRA
model under FSDP2 (adapter/ and the merged model/ agree).

One spawn of 2 ranks for the file (imports cost seconds on 2 cores). A collective that hangs would
fail after GLOO_TIMEOUT_S instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 120
STEPS, HALF = 6, 4  # the resumed pair runs from the checkpoint at HALF to STEPS
N_TRAIN, N_VAL = 32, 5


def items(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(4, 500, (length,), generator=g).tolist()
        split = length // 2
        out.append({"input_ids": ids, "labels": [-100] * split + ids[split:]})
    return out


def collate(batch: list[dict]) -> dict:
    T = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), T), 3, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_config(steps: int):
    from rayapp.config.base import TrainConfig

    # A constant learning rate: a run cut at HALF and resumed to STEPS follows the same schedule as one run.
    return TrainConfig(global_batch_size=8, micro_batch_size=2, learning_rate=3e-3, max_steps=steps, warmup_ratio=0,
                       min_lr_ratio=1.0, checkpoint_every=2, eval_every=3, max_grad_norm=1.0)


def run_fit(strategy: str, steps: int, reporter, metrics_path=None, lora: bool = False):
    from rayapp.models.io import load_causal_lm, resolve_model
    from rayapp.training.loop import count_supervised, fit
    from rayapp.training.parallel import prepare_model
    from rayapp.training.sft import sft_loss

    torch.manual_seed(0)
    model = load_causal_lm(str(resolve_model("tiny")))
    if lora:
        from rayapp.config.base import AdapterConfig
        from rayapp.models.lora import apply_lora

        model = apply_lora(model, AdapterConfig(rank=4))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # lora_B starts at 0: make the adapter matter from step 1
    model = prepare_model(model, strategy, "cpu", "fp32")
    result = fit(model=model, train_items=items(N_TRAIN, 1), val_items=items(N_VAL, 2), collate=collate,
                 count_fn=count_supervised, loss_fn=sft_loss, cfg=train_config(steps), micro_batch_size=2,
                 reporter=reporter, metrics_path=metrics_path)
    return model, result


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    from rayapp.storage import open_output
    from rayapp.training.loop import LocalReporter
    from rayapp.training.outputs import export_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    res: dict = {}
    metrics = os.path.join(out, "metrics.jsonl") if rank == 0 else None
    # 1. HALF steps with checkpoints every 2 (sharded, both ranks into one directory per step).
    _, first = run_fit("fsdp", HALF, LocalReporter(os.path.join(out, "ckpt")), metrics)
    res["first"] = first.metrics
    # 2. A fresh model resumes from the checkpoint at HALF and trains to STEPS.
    _, resumed = run_fit("fsdp", STEPS, LocalReporter(os.path.join(out, "ckpt")), metrics)
    res["resumed"], res["resumed_from"] = resumed.metrics, resumed.resumed_from
    # 3. LoRA under FSDP2: 2 steps, then the shared export (adapter/ and merged model/).
    from rayapp.models.io import load_tokenizer, resolve_model

    model, _ = run_fit("fsdp", 2, LocalReporter(), lora=True)
    cfg = types.SimpleNamespace(adapter=types.SimpleNamespace(export="both"))
    w = types.SimpleNamespace(rank=rank, store=open_output(os.path.join(out, "export")))
    res["written"] = export_model(model, load_tokenizer(str(resolve_model("tiny"))), cfg, w)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, tiny_model_dir):
    out = str(tmp_path_factory.mktemp("loop_fsdp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return {"out": out, "ranks": ranks}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir):
    from rayapp.training.loop import LocalReporter

    torch.set_num_threads(1)
    _, result = run_fit("none", STEPS, LocalReporter())
    return result.metrics


def test_fsdp_loop_matches_one_process_with_uneven_validation(distributed, one_process):
    from rayapp.training.loop import even_batches

    # rank 0 holds 3 validation items (2 micro-batches), rank 1 holds 2 (1 + a stand-in forward)
    assert even_batches(N_VAL, 0, 2, 2) == [[0, 2], [4]] and even_batches(N_VAL, 1, 2, 2) == [[1, 3], None]
    r0, r1 = distributed["ranks"]
    assert r0["resumed"]["loss"] == pytest.approx(one_process["loss"], rel=1e-4)
    assert r0["resumed"]["val_loss"] == pytest.approx(one_process["val_loss"], rel=1e-4)
    assert r0["resumed"]["grad_norm"] == pytest.approx(one_process["grad_norm"], rel=1e-3)
    assert r1["resumed"]["val_loss"] == r0["resumed"]["val_loss"]  # both ranks see the global value


def test_sharded_checkpoint_resumes_at_the_step(distributed):
    out = distributed["out"]
    r0, r1 = distributed["ranks"]
    assert r0["resumed_from"] == r1["resumed_from"] == HALF
    files = sorted(os.listdir(os.path.join(out, "ckpt", f"step_{HALF:06d}")))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "state.pt"]
    meta = json.load(open(os.path.join(out, "ckpt", f"step_{HALF:06d}", "meta.json")))
    assert meta == {"step": HALF, "format": "rayapp-ckpt-v3", "world_size": 2}
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))


def test_lora_export_under_fsdp_adapter_and_merged_model_agree(distributed, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r0, r1 = distributed["ranks"]
    export = os.path.join(distributed["out"], "export")
    assert r1["written"] == {} and r0["written"] == {"adapter": os.path.join(export, "adapter"),
                                                     "model": os.path.join(export, "model")}
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(export, "model")).state_dict()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), os.path.join(export, "adapter"))
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) for p in lora_b)
    reference = peft.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[name], base[name])  # the adapter is in the merged weights
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k], atol=1e-5, rtol=0, msg=k)
