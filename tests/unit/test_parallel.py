"""rayapp.training.parallel on 2 CPU processes over gloo, against one process on the full batch.

Two spawns of 2 ranks for the whole file (a spawn costs seconds of imports on 2 cores): the first
runs every scenario and saves what it saw; the second is a fresh pair that resumes from the
sharded checkpoint the first wrote. Each test asserts on those results against a single-process
reference computed here.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayapp.training import parallel as P

STEPS = 10
SAVE_AT = 3  # the first run saves a sharded checkpoint after this many steps
RESUME_STEPS = 2
LR = 1e-2
MAX_NORM = 0.5  # small enough that clipping acts on most steps
BATCH, SEQ = 4, 16  # global batch; each of the 2 ranks takes 2 rows


def tiny_config():
    from transformers import LlamaConfig

    # vocab and intermediate sizes are odd so that FSDP2's dim-0 split is uneven (rank 0 holds one row more).
    return LlamaConfig(vocab_size=251, hidden_size=64, intermediate_size=131, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                       max_position_embeddings=64)


def build_model(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config())


def add_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


class ValueHeadLM(torch.nn.Module):
    """A language model inside a wrapper, as the RL value head and the distillation projector hold it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)

    def forward(self, input_ids):
        out = self.lm(input_ids=input_ids, output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1)


def batch(step: int) -> torch.Tensor:
    """Two batches of random tokens, in turn: the model can learn them, so the loss falls."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    return torch.randint(0, 251, (BATCH, SEQ), generator=g)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss. Every row has SEQ-1 targets, so the mean over ranks of per-rank means is
    the global mean, and FSDP2 / DDP gradient averaging gives the full-batch gradient."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def train(model, opt, steps, rank: int = 0, world: int = 1, first: int = 0, after_step=None):
    losses, norms = [], []
    for step in range(first, first + steps):
        ids = batch(step)[rank::world]
        loss = loss_of(model, ids)
        loss.backward()
        norms.append(P.clip_grad_norm(model, MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            loss = loss.detach()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if after_step:
            after_step(step + 1)
    return losses, norms


def full_grads(model) -> dict[str, torch.Tensor]:
    return {n: P._full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- the 2-rank worker


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(P.process_group_backend("cpu"), rank=rank, world_size=world)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    res: dict = {}

    # The group shape process_group_backend("cuda") asks for ("cpu:gloo,cuda:nccl"), with gloo standing in
    # for NCCL (a CPU torch has none), serves CPU tensors; a group without a CPU backend refuses them.
    mapped = dist.new_group(backend=P.process_group_backend("cuda").replace("nccl", "gloo"))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=mapped)
    res["mapped_all_reduce"] = float(t)
    cuda_only = dist.new_group(backend="cuda:gloo")
    try:
        dist.all_reduce(torch.ones(1), group=cuda_only)
        res["cuda_only_error"] = None
    except RuntimeError as e:
        res["cuda_only_error"] = str(e)

    # FSDP2, fp32: loss curve, norms, shards, sharded checkpoint after SAVE_AT steps, full weights.
    model = P.prepare_model(build_model(0), "fsdp", "cpu", "fp32")
    res["local_numel"] = {n: p.to_local().numel() for n, p in model.named_parameters()}
    res["is_dtensor"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def maybe_save(done: int) -> None:
        if done == SAVE_AT:
            P.save_sharded(os.path.join(out, f"ckpt_rank{rank}"), model, opt)  # per-rank dirs, as Ray Train workers

    res["fsdp_losses"], res["fsdp_norms"] = train(model, opt, STEPS, rank, world, after_step=maybe_save)
    res["full_state"] = P.full_state_dict(model)
    res["buckets"] = [[(n, tuple(t.shape), t.numel() * t.element_size()) for n, t in b]
                      for b in P.iter_full_params(model, bucket_bytes=40_000)]
    if rank == 0:
        # save_pretrained pops the tensors out of the dict it is given: pass a copy to keep ours.
        P.unwrap(model).save_pretrained(os.path.join(out, "export"), state_dict=dict(res["full_state"]))

    # DDP, fp32: the same curve.
    model = P.prepare_model(build_model(0), "ddp", "cpu", "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    res["ddp_losses"], res["ddp_norms"] = train(model, opt, STEPS, rank, world)
    res["ddp_full_state_is_none"] = P.full_state_dict(model) is None
    # DDP through the same sharded checkpoint: rank 0 writes the (replicated) tensors once.
    P.save_sharded(os.path.join(out, f"ddp_rank{rank}"), model, opt)
    dist.barrier()
    if rank == 0:
        for r in range(world):
            shutil.copytree(os.path.join(out, f"ddp_rank{r}"), os.path.join(out, "ddp_merged"), dirs_exist_ok=True)
    dist.barrier()
    fresh = P.prepare_model(build_model(99), "ddp", "cpu", "fp32")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
    P.load_sharded(os.path.join(out, "ddp_merged"), fresh, fresh_opt)
    res["ddp_reload_equal"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                      fresh.state_dict().values(), strict=True))
    res["ddp_reload_losses"] = [train(m, o, 1, rank, world, first=STEPS)[0][0] for m, o in ((model, opt), (fresh, fresh_opt))]

    # FSDP2 with and without activation checkpointing: the same gradients.
    for ac in (False, True):
        model = P.prepare_model(build_model(1), "fsdp", "cpu", "fp32", activation_checkpointing=ac)
        loss_of(model, batch(0)[rank::world]).backward()
        res[f"grads_ac_{ac}"] = full_grads(model)
    # What clipping each rank's shard by its own norm would use, against the global norm.
    res["shard_norm"] = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.to_local()) for p in model.parameters()])))
    res["global_norm"] = P.clip_grad_norm(model, 1e9)

    # FSDP2, bf16-mixed: fp32 masters, gradients and optimizer state; loss close to fp32's.
    model = P.prepare_model(build_model(0), "fsdp", "cpu", "bf16-mixed", activation_checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    res["bf16_losses"], _ = train(model, opt, 3, rank, world)
    loss_of(model, batch(0)[rank::world]).backward()
    res["bf16_dtypes"] = {
        "params": {str(p.dtype) for p in model.parameters()} | {str(p.to_local().dtype) for p in model.parameters()},
        "grads": {str(p.grad.dtype) for p in model.parameters()},
        "adam": {str(s["exp_avg"].dtype) for s in opt.state.values()},
    }

    # LoRA under FSDP2: frozen base and trainable adapters in the same units.
    model = P.prepare_model(add_lora(build_model(2)), "fsdp", "cpu", "fp32")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    res["lora_losses"], res["lora_norms"] = train(model, opt, 3, rank, world)
    res["lora_full_state"] = P.full_state_dict(model)
    res["lora_buckets"] = [[n for n, _ in b] for b in P.iter_full_params(model, bucket_bytes=1)]

    # A wrapped LM (value head) under FSDP2 with activation checkpointing: layers found inside the
    # wrapper, one step trains, and the LM's full weights come out under the LM's own names.
    model = P.prepare_model(ValueHeadLM(build_model(0)), "fsdp", "cpu", "fp32", activation_checkpointing=True)
    res["wrapped_units"] = sum(type(m).__name__.startswith("FSDP") for m in model.modules())
    logits, values = model(batch(0)[rank::world])
    (logits.float().logsumexp(-1).mean() + values.pow(2).mean()).backward()
    res["wrapped_norm"] = P.clip_grad_norm(model, 1e9)
    res["wrapped_lm_keys"] = list(P.full_state_dict(model.lm) or {})

    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    model = P.prepare_model(build_model(99), "fsdp", "cpu", "fp32")  # other weights: the load must replace them
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    P.load_sharded(os.path.join(out, "merged"), model, opt)
    losses, _ = train(model, opt, RESUME_STEPS, rank, world, first=SAVE_AT)
    torch.save({"losses": losses}, os.path.join(out, f"resume_rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, out: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(2, port, out), nprocs=2, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parallel"))
    _spawn(_worker, out)
    # What Ray Train does with the checkpoints its workers report: every rank's files in one directory.
    merged = os.path.join(out, "merged")
    os.makedirs(merged)
    for r in range(2):
        for name in os.listdir(os.path.join(out, f"ckpt_rank{r}")):
            assert not os.path.exists(os.path.join(merged, name)), f"ranks wrote the same file {name}"
            shutil.copy(os.path.join(out, f"ckpt_rank{r}", name), merged)
    _spawn(_resume_worker, out)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    resumed = [torch.load(os.path.join(out, f"resume_rank{r}.pt"), weights_only=False) for r in range(2)]
    return {"out": out, "ranks": ranks, "resumed": resumed, "merged_files": sorted(os.listdir(merged))}


@pytest.fixture(scope="module")
def reference():
    """One process, full batch of BATCH rows per step, the same initial weights and optimizer."""
    torch.set_num_threads(1)
    model = P.prepare_model(build_model(0), "none", "cpu", "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = train(model, opt, STEPS)
    lora = P.prepare_model(add_lora(build_model(2)), "none", "cpu", "fp32")
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=LR)
    lora_losses, lora_norms = train(lora, lora_opt, 3)
    return {"losses": losses, "norms": norms, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "lora": lora, "lora_losses": lora_losses, "lora_norms": lora_norms}


# ----------------------------------------------------------------------------- tests


def test_backend_choice_and_cpu_collectives(runs):
    assert P.process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert P.process_group_backend("cpu") == "gloo"
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        P.process_group_backend("mps")
    for res in runs["ranks"]:
        assert res["mapped_all_reduce"] == 3.0  # 1 + 2 over the group with a CPU backend
        assert "No backend type associated with device type cpu" in res["cuda_only_error"]


def test_fsdp_matches_one_process(runs, reference):
    r0, r1 = runs["ranks"]
    assert r0["fsdp_losses"] == r1["fsdp_losses"]
    assert r0["fsdp_losses"] == pytest.approx(reference["losses"], abs=1e-4)
    assert reference["losses"][-1] < reference["losses"][0] - 0.1  # it did train
    assert r0["ddp_losses"] == pytest.approx(reference["losses"], abs=1e-4)


def test_clip_norm_is_global(runs, reference):
    r0, r1 = runs["ranks"]
    assert sum(n > MAX_NORM for n in reference["norms"]) >= STEPS // 2  # clipping acted
    for res in (r0, r1):
        assert res["fsdp_norms"] == pytest.approx(reference["norms"], rel=1e-4)
        assert res["ddp_norms"] == pytest.approx(reference["norms"], rel=1e-4)
    # Each rank's shard norm (what clipping the FSDP1 module per rank used) is not the global norm:
    # the global norm is the root of the sum of their squares, and every rank returns it.
    shard = [res["shard_norm"] for res in (r0, r1)]
    assert r0["global_norm"] == r1["global_norm"] == pytest.approx((shard[0] ** 2 + shard[1] ** 2) ** 0.5, rel=1e-5)
    assert max(shard) < 0.95 * r0["global_norm"]
    model = build_model(1)  # the same gradient in one process
    loss_of(model, batch(0)).backward()
    assert P.clip_grad_norm(model, 1e9) == pytest.approx(r0["global_norm"], rel=1e-5)


def test_parameters_are_sharded_over_ranks(runs):
    r0, r1 = runs["ranks"]
    assert r0["is_dtensor"]
    model = build_model(0)
    total = sum(p.numel() for p in model.parameters())
    n0, n1 = sum(r0["local_numel"].values()), sum(r1["local_numel"].values())
    assert n0 + n1 == total
    assert abs(n0 - n1) <= 251 * 64 + 131 * 64 * 2  # rank 0 holds one row more of the odd-sized dims
    emb = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert r0["local_numel"]["model.embed_tokens.weight"] == 126 * 64  # ceil(251 / 2) rows
    assert r1["local_numel"]["model.embed_tokens.weight"] == 125 * 64
    assert emb.numel() == 251 * 64


def test_plan_matches_the_sharded_model(runs, tmp_path):
    """rayapp plan's per-worker parameter, gradient and AdamW bytes under FSDP2 are those of the fullest
    rank of the real 2-rank run (uneven vocab and MLP sizes), and DDP's are the whole model's."""
    import json

    from rayapp import plan

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    shape = plan.model_shape(str(tmp_path))
    total = sum(p.numel() for p in build_model(0).parameters())
    assert shape.params == total
    most = max(sum(r["local_numel"].values()) for r in runs["ranks"])
    assert most > total / 2  # the split is uneven here
    fsdp = plan.training_memory(shape, "float32", num_workers=2, strategy="fsdp")
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (4 * most, 4 * most, 8 * most)
    ddp = plan.training_memory(shape, "float32", num_workers=2, strategy="ddp")
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * total, 4 * total, 8 * total)


def test_sharded_checkpoint_resumes_exactly(runs):
    r0 = runs["ranks"][0]
    assert ".metadata" in runs["merged_files"] and len([f for f in runs["merged_files"] if f.endswith(".distcp")]) == 2
    for res in runs["resumed"]:
        assert res["losses"] == r0["fsdp_losses"][SAVE_AT:SAVE_AT + RESUME_STEPS]


def test_ddp_sharded_checkpoint_round_trip(runs):
    for res in runs["ranks"]:
        assert res["ddp_reload_equal"]
        trained, reloaded = res["ddp_reload_losses"]
        assert trained == reloaded  # weights and AdamW state restored: the next step is the same


def test_full_state_dict_equals_one_process_weights(runs, reference):
    r0, r1 = runs["ranks"]
    assert r1["full_state"] is None and r0["ddp_full_state_is_none"] is False and r1["ddp_full_state_is_none"]
    full, ref = r0["full_state"], reference["state"]
    assert list(full) == list(ref)  # same names, same order, lm_head.weight included (tied)
    for name in ref:
        assert full[name].shape == ref[name].shape and full[name].device.type == "cpu"
        torch.testing.assert_close(full[name], ref[name], atol=1e-4, rtol=0)
    assert full["lm_head.weight"] is full["model.embed_tokens.weight"]


def test_export_loads_in_transformers(runs, reference):
    import json

    from transformers import AutoModelForCausalLM

    d = os.path.join(runs["out"], "export")
    assert json.load(open(os.path.join(d, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(d)
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, runs["ranks"][0]["full_state"][name], atol=0, rtol=0)


def test_iter_full_params_buckets(runs):
    for res in runs["ranks"]:
        buckets = res["buckets"]
        full = runs["ranks"][0]["full_state"]
        flat = [(n, s) for b in buckets for n, s, _ in b]
        assert flat == [(n, tuple(t.shape)) for n, t in full.items() if n != "lm_head.weight"]  # tied: sent once
        for b in buckets:
            assert sum(nb for _, _, nb in b) <= 40_000 or len(b) == 1
        assert len(buckets) > 3
    assert runs["ranks"][0]["buckets"] == runs["ranks"][1]["buckets"]


def test_activation_checkpointing_same_gradients(runs):
    for res in runs["ranks"]:
        plain, ac = res["grads_ac_False"], res["grads_ac_True"]
        assert plain.keys() == ac.keys() and len(plain) == 20  # lm_head is tied to the embeddings
        for name in plain:
            torch.testing.assert_close(ac[name], plain[name], atol=1e-5, rtol=0)
    # and in one process, full and LoRA (frozen embeddings: no input needs a gradient)
    grads = []
    for ac in (False, True):
        model = P.prepare_model(build_model(1), "none", "cpu", "fp32", activation_checkpointing=ac)
        loss_of(model, batch(0)).backward()
        grads.append(full_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads[0][name], runs["ranks"][0]["grads_ac_False"][name], atol=1e-5, rtol=0)
    lora = []
    for ac in (False, True):
        model = add_lora(build_model(1))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(7))
        model = P.prepare_model(model, "none", "cpu", "fp32", activation_checkpointing=ac)
        loss_of(model, batch(0)).backward()
        lora.append(full_grads(model))
    assert len(lora[0]) == 2 * 7 * 2  # lora_A and lora_B of 7 linears in 2 layers
    for name in lora[0]:
        torch.testing.assert_close(lora[1][name], lora[0][name], atol=1e-5, rtol=0)


def test_bf16_mixed_keeps_fp32_masters(runs, reference):
    for res in runs["ranks"]:
        assert res["bf16_dtypes"] == {"params": {"torch.float32"}, "grads": {"torch.float32"}, "adam": {"torch.float32"}}
        assert all(torch.isfinite(torch.tensor(res["bf16_losses"])))
        assert res["bf16_losses"] == pytest.approx(reference["losses"][:3], rel=2e-2)


def test_bf16_mixed_one_process_autocast():
    model = P.prepare_model(build_model(0), "none", "cpu", "bf16-mixed")
    out = model(input_ids=batch(0))
    assert out.logits.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref = build_model(0)
    loss, ref_loss = loss_of(model, batch(0)), loss_of(ref, batch(0))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2) and loss.item() != ref_loss.item()  # bf16 compute
    loss.backward()
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_mixed_refuses_bf16_masters():
    with pytest.raises(ValueError, match=r"float32 master weights.*torch.bfloat16.*model.dtype: float32"):
        P.prepare_model(build_model(0).to(torch.bfloat16), "none", "cpu", "bf16-mixed")
    with pytest.raises(ValueError, match="auto"):
        P.prepare_model(build_model(0), "none", "cpu", "auto")
    with pytest.raises(RuntimeError, match="process_group_backend"):
        P.prepare_model(build_model(0), "fsdp", "cpu", "fp32")


def test_lora_under_fsdp(runs, reference):
    r0, r1 = runs["ranks"]
    assert r0["lora_losses"] == pytest.approx(reference["lora_losses"], abs=1e-4)
    assert r0["lora_norms"] == pytest.approx(reference["lora_norms"], rel=1e-4)
    assert reference["lora_losses"][-1] < reference["lora_losses"][0]
    merged = reference["lora"].merge_and_unload().state_dict()
    full = r0["lora_full_state"]
    assert r1["lora_full_state"] is None
    assert list(full) == list(merged)
    for name in merged:
        torch.testing.assert_close(full[name], merged[name], atol=1e-4, rtol=0)
    # the adapters did move the weights away from the base
    base = build_model(2).state_dict()
    assert not torch.allclose(full["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert [n for b in r0["lora_buckets"] for n in b] == [n for n in merged if n != "lm_head.weight"]


def test_lora_merge_one_process_is_exact():
    model = add_lora(build_model(3))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # lora_B starts at zero: make the merge matter
    full = P.full_state_dict(model)
    merged = model.merge_and_unload().state_dict()
    assert list(full) == list(merged)
    for name in merged:
        torch.testing.assert_close(full[name], merged[name], atol=0, rtol=0)


def test_unwrap_and_decoder_layers():
    model = add_lora(build_model(0))
    hf = P.unwrap(model)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert [type(m).__name__ for m in P.decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(ValueError, match="strategy"):
        P.prepare_model(build_model(0), "zero3", "cpu")


def test_sharded_checkpoint_lora_one_process(tmp_path):
    """Without a process group DCP writes one shard; LoRA saves only the adapters and their AdamW state."""
    model = P.prepare_model(add_lora(build_model(2)), "none", "cpu", "fp32")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, opt, 2)
    P.save_sharded(tmp_path / "ckpt", model, opt)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [".metadata", "__0_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    assert not any("base_layer" in k for k in saved) and any("lora_A" in k for k in saved)

    fresh = P.prepare_model(add_lora(build_model(2)), "none", "cpu", "fp32")
    for p in fresh.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=LR)
    P.load_sharded(tmp_path / "ckpt", fresh, fresh_opt)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert train(fresh, fresh_opt, 1, first=2)[0] == train(model, opt, 1, first=2)[0]
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        P.load_sharded(tmp_path, fresh, fresh_opt)


def test_wrapped_language_model(runs, reference):
    r0, r1 = runs["ranks"]
    assert r0["wrapped_units"] == 3  # 2 decoder layers + the root
    assert r0["wrapped_norm"] == r1["wrapped_norm"] > 0
    assert r0["wrapped_lm_keys"] == list(reference["state"]) and r1["wrapped_lm_keys"] == []
    model = ValueHeadLM(build_model(0))
    P.enable_activation_checkpointing(model)
    assert model.lm.model.gradient_checkpointing
    with pytest.raises(ValueError, match="set train.activation_checkpointing: false"):
        P.enable_activation_checkpointing(torch.nn.Linear(2, 2))
