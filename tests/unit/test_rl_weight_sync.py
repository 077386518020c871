"""What the weight sync sends, without engines: the causal LM's Hugging Face weights (LoRA merged,
no value head) in buckets; the safetensors blobs the CPU transport moves; and the name / dtype /
shape / bucketing layer of the NCCL transport, driven through vLLM's own checks (no NCCL here).
The same layer under FSDP2 on two processes is in test_weight_sync_fsdp.py."""

from __future__ import annotations

import pytest
import torch

from rayapp.models.io import load_causal_lm
from rayapp.teachers import weight_sync as ws


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def _lora(tiny_model_dir):
    from rayapp.config.base import AdapterConfig
    from rayapp.models.lora import apply_lora

    peft_model = apply_lora(load_causal_lm(tiny_model_dir), AdapterConfig(rank=4))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return peft_model


def _sent(model, bucket_bytes=ws.DEFAULT_BUCKET_BYTES, dtype=None) -> dict[str, torch.Tensor]:
    return {n: t for bucket in ws.full_buckets(model, bucket_bytes, dtype) for n, t in bucket}


def test_plain_model_sends_its_hf_weights_once_and_no_value_head(tiny_lm):
    from rayapp.models.value_head import CausalLMWithValueHead

    sent = _sent(CausalLMWithValueHead(tiny_lm))
    hf = tiny_lm.state_dict()
    aliases = ws.tied_aliases(tiny_lm)
    assert aliases == {"model.embed_tokens.weight": ["lm_head.weight"]}  # the tiny model ties its output layer
    assert set(sent) == set(hf) - {"lm_head.weight"}  # a tied tensor goes once...
    assert all(torch.equal(sent[k], hf[k]) for k in sent)
    meta = ws.full_param_meta(CausalLMWithValueHead(tiny_lm))
    assert [(n, tuple(t.shape), t.dtype) for n, t in sent.items()] == [(n, s, d) for n, d, s in meta]


def test_lora_is_merged_like_merge_and_unload(tiny_model_dir):
    peft_model = _lora(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    sent = _sent(peft_model)
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())  # training continues unmerged
    assert not any("lora_" in k or "base_layer" in k for k in sent)
    meta = ws.full_param_meta(peft_model)
    assert [n for n, _, _ in meta] == list(sent)
    merged = peft_model.merge_and_unload().state_dict()
    for k, t in sent.items():
        torch.testing.assert_close(t, merged[k])
    base = load_causal_lm(tiny_model_dir).state_dict()
    assert any(not torch.equal(sent[k], base[k]) for k in sent if "q_proj" in k)  # the adapters did change something


def test_buckets_respect_the_size_and_cast_to_the_wire_dtype(tiny_lm):
    limit = 300_000
    buckets = list(ws.full_buckets(tiny_lm, limit, torch.bfloat16))
    assert len(buckets) > 3
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= limit or len(bucket) == 1  # a tensor larger than a bucket travels alone
        assert all(t.dtype == torch.bfloat16 for _, t in bucket)
    meta = ws.full_param_meta(tiny_lm, torch.bfloat16)
    assert [n for b in buckets for n, _ in b] == [n for n, _, _ in meta] and {d for _, d, _ in meta} == {torch.bfloat16}


def test_serialized_bucket_is_a_safetensors_file_with_the_tied_names(tiny_lm):
    from safetensors.torch import load

    bucket = next(ws.full_buckets(tiny_lm, ws.DEFAULT_BUCKET_BYTES))
    blob = ws.serialize_bucket(bucket, ws.tied_aliases(tiny_lm))
    loaded = load(blob.tobytes())
    assert set(loaded) == {n for n, _ in bucket} | {"lm_head.weight"}
    torch.testing.assert_close(loaded["lm_head.weight"], tiny_lm.state_dict()["model.embed_tokens.weight"])
    # a state dict whose tied tensors share storage (what transformers' state_dict() returns) also serialises
    state = dict(ws.state_buckets(tiny_lm.state_dict(), 10**9).__next__())
    assert set(load(ws.serialize_bucket(list(state.items())).tobytes())) == set(tiny_lm.state_dict())


def test_packed_bucket_round_trips_every_dtype_and_the_tied_names(tiny_lm):
    import pickle

    bucket = next(ws.full_buckets(tiny_lm, ws.DEFAULT_BUCKET_BYTES))
    bucket += [("b16", torch.tensor([1.5, -2.25], dtype=torch.bfloat16)), ("step", torch.tensor([3], dtype=torch.int64)),
               ("strided", torch.arange(12.0).reshape(3, 4).t())]
    packed = ws.pack_bucket(bucket, ws.tied_aliases(tiny_lm))
    # through pickle protocol 5, as Ray's object store moves it: the arrays travel as they are
    got = dict(ws.unpack_buckets([pickle.loads(pickle.dumps(packed, protocol=5))]))
    assert set(got) == {n for n, _ in bucket} | {"lm_head.weight"}
    for name, t in bucket:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    torch.testing.assert_close(got["lm_head.weight"], tiny_lm.state_dict()["model.embed_tokens.weight"])
    assert sum(a.nbytes for _, _, a in packed) == sum(t.numel() * t.element_size() for _, t in bucket)  # tied: sent once


def test_staging_writes_whole_files_and_drops_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ws.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(ws.os.path, "isdir", lambda p: False)  # as on a node without /dev/shm
    blob = ws.serialize_bucket([("w", torch.ones(3))])
    assert ws.write_staged("v1", "bucket-00000.safetensors", blob) == blob.nbytes
    d = ws.staging_dir("v1")
    assert d.startswith(str(tmp_path)) and sorted(p.name for p in (tmp_path / d.split("/")[-1]).iterdir()) == ["bucket-00000.safetensors"]
    ws.drop_staged("v1")
    assert not (tmp_path / d.split("/")[-1]).exists()


def test_transport_choice():
    assert ws.resolve_transport("auto", use_gpu=False) == "shm"
    assert ws.resolve_transport("auto", use_gpu=True) == "nccl"
    assert ws.resolve_transport("shm", use_gpu=True) == "shm"
    with pytest.raises(ws.WeightSyncError, match="rl.weight_sync"):
        ws.resolve_transport("gloo", use_gpu=False)
    assert ws.wire_dtype("bfloat16") is torch.bfloat16 and ws.wire_dtype("auto") is None


def test_nccl_ranks_do_not_collide_across_engines():
    info = {"master_address": "10.0.0.1", "master_port": 29500, "world_size": 1 + 3 * 2, "rank_offset": 1}
    infos = ws.engine_init_infos(info, [2, 2, 2])
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]  # engine workers take ranks 1-2, 3-4, 5-6
    with pytest.raises(ws.WeightSyncError, match="world_size 7"):
        ws.engine_init_infos(info, [2, 2])


def test_nccl_source_passes_vllms_own_checks(tiny_model_dir):
    """The WeightSource the NCCL engine sends from: vLLM sizes the receivers' buffers from
    metadata() and checks the stream against it while sending (_checked_iter); its gather groups
    (iter_groups) must come out in metadata order. Plain and LoRA, float32 and a bf16 wire."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerWeightTransferEngine,
        NCCLWeightTransferUpdateInfo,
    )

    for model, dtype in ((load_causal_lm(tiny_model_dir), None), (_lora(tiny_model_dir), torch.bfloat16)):
        source = ws.full_params_source(model, bucket_bytes=400_000, dtype=dtype)
        meta = source.metadata()
        info = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        assert NCCLWeightTransferUpdateInfo(**asdict(info)).names == info.names  # what the workers parse
        sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))  # raises on any disagreement
        assert len(sent) == len(meta) and source.bytes == sum(t.numel() * t.element_size() for _, t in sent)
        assert len(source.bucket_sizes) > 3 and sum(n for _, n in source.bucket_sizes) == len(meta)
        assert all(size <= 400_000 or n == 1 for size, n in source.bucket_sizes)  # a tensor over the limit travels alone
        groups = list(source.iter_groups())
        assert [n for names, _ in groups for n in names] == [m.name for m in meta]
        reference = _sent(model, dtype=dtype)
        assert all(torch.equal(t, reference[n]) for n, t in sent)
    # A source that disagrees with its metadata is refused, naming the tensor (not a hang).
    broken = ws.full_params_source(load_causal_lm(tiny_model_dir))
    bad_meta = list(broken.metadata())
    bad_meta[1] = type(bad_meta[1])(bad_meta[1].name, bad_meta[1].dtype, (1,))
    with pytest.raises(ValueError, match=bad_meta[1].name):
        list(NCCLTrainerWeightTransferEngine._checked_iter(broken, bad_meta))


def test_collate_rollouts_labels_only_response_tokens():
    from rayapp.training.rlhf_rollout import collate_rollouts

    rollouts = [
        {"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "score": 1.0},
        {"prompt_ids": [5], "response_ids": [10, 11, 12], "score": 0.0},
    ]
    b = collate_rollouts(rollouts, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 10, 11, 12, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["scores"].tolist() == [1.0, 0.0]
