"""The weight sync's trainer side under FSDP2, on 2 CPU processes over gloo (no NCCL, no engines).

Rank 0 is the sender: it walks the NCCL transport's WeightSource through vLLM's own check
(``_checked_iter``: every tensor against the metadata the receivers size their buffers from) and
the CPU transport's buckets. Rank 1 takes the non-sender paths the real code takes: vLLM's
``NCCLTrainerWeightTransferEngine.send_weights`` with ``is_sender=False`` and
``ObjectStoreSync.push`` on rank 1; both only join the gathers. What rank 0 got must be the full,
LoRA-merged weights of a single-process copy of the same model, with full (not sharded) shapes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BUCKET = 40_000  # bytes: several buckets for this model


def _model(seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=251, hidden_size=64, intermediate_size=131, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from rayapp.teachers import weight_sync as ws
    from rayapp.training import parallel as P

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(P.process_group_backend("cpu"), rank=rank, world_size=world)
    model = P.prepare_model(_model(0), "fsdp", "cpu", "fp32")
    source = ws.full_params_source(model, BUCKET)
    res: dict = {"sharded": ws._is_sharded(model)}
    if rank == 0:
        meta = source.metadata()
        res["meta"] = [(m.name, m.dtype, m.shape) for m in meta]
        res["nccl"] = {n: t.clone() for n, t in NCCLTrainerWeightTransferEngine._checked_iter(source, meta)}
        res["bucket_sizes"] = source.bucket_sizes
        res["shm"] = {n: t.clone() for b in ws.full_buckets(model, BUCKET) for n, t in b}
    else:
        NCCLTrainerWeightTransferEngine(client=None, source=source, is_sender=False).send_weights()
        assert ws.ObjectStoreSync(pool=None, rank=1, bucket_bytes=BUCKET).push(model) == 0.0
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sync_fsdp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_sender_gets_full_merged_weights_under_fsdp(ranks):
    r0 = ranks[0]
    assert r0["sharded"] and ranks[1]["sharded"]
    reference = _model(0).merge_and_unload().state_dict()
    reference.pop("lm_head.weight")  # tied: sent once, as model.embed_tokens.weight
    assert list(r0["nccl"]) == list(reference)
    for name, t in r0["nccl"].items():
        assert tuple(t.shape) == tuple(reference[name].shape)  # full, not rank 0's shard
        torch.testing.assert_close(t, reference[name])
        assert torch.equal(r0["shm"][name], t)  # the CPU transport sends the very same tensors
    assert [(n, tuple(s)) for n, _, s in r0["meta"]] == [(n, tuple(t.shape)) for n, t in reference.items()]
    assert len(r0["bucket_sizes"]) > 3 and all(size <= BUCKET or n == 1 for size, n in r0["bucket_sizes"])
