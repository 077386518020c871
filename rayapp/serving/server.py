"""Serve deployment classes (imported only where a deployment is built: they pull in ray.serve.llm and FastAPI).

They live at module level so that Ray pickles them by reference: rayapp must be importable
on the cluster's nodes (it is installed into the same environment).

The one module that imports ``ray.llm._internal``: what ray.serve.llm (Ray 2.60) has no public
API for (LoRA ids and the multiplex loader, model cards, the ingress's FastAPI app). The rest of
rayapp uses ``ray.serve.llm``'s public names only.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from ray import serve
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import init as ingress_fastapi_app
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress

__all__ = ["RayappIngress", "RayappLLMServer", "ingress_fastapi_app", "to_model_metadata"]


class RayappLLMServer(LLMServer):
    """``LLMServer`` whose LoRA adapters come from local directories named at deploy time; what came
    from an s3:// / gs:// URI (``sources``) is downloaded into this replica's node cache first."""

    async def __init__(self, llm_config, *, adapters: dict[str, str] | None = None, sources: dict | None = None,
                       **kwargs):
        self._adapter_dirs = dict(adapters or {})
        sources = sources or {}
        if sources.get("model") is not None:  # an OutputStore: downloaded once into this node's cache
            llm_config.model_loading_config.model_source = str(sources["model"].fetch_dir())
        for name, store in (sources.get("adapters") or {}).items():
            self._adapter_dirs[name] = str(store.fetch_dir())
        await super().__init__(llm_config, **kwargs)

    def _init_multiplex_loader(self, model_downloader_cls=None):
        mx = self._llm_config.multiplex_config()
        if mx is None:
            return super()._init_multiplex_loader(model_downloader_cls)
        adapter_dirs = self._adapter_dirs

        async def _load_model(lora_model_id: str) -> DiskMultiplexConfig:
            name = get_lora_id(lora_model_id)
            if name not in adapter_dirs:
                raise ValueError(f"unknown adapter '{name}'; served adapters: {sorted(adapter_dirs)}")
            return DiskMultiplexConfig(
                model_id=lora_model_id, max_total_tokens=None, local_path=adapter_dirs[name],
                lora_assigned_int_id=global_id_manager.next(),
            )

        self._load_model = serve.multiplexed(max_num_models_per_replica=mx.max_num_models_per_replica)(_load_model)




class RayappIngress(OpenAiIngress):
    """``OpenAiIngress`` with adapters addressed by plain name and listed in ``/v1/models``."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, adapter_names=()):
        super().__init__(llm_deployments, model_cards, lora_paths=None)
        self._base_id = next(iter(model_cards))
        self._adapter_names = list(adapter_names)

    def _full_id(self, model: str | None) -> str | None:
        if model in self._adapter_names:
            return f"{self._base_id}:{model}"
        if model and ":" in model and model not in self._model_cards:
            if get_lora_id(model) not in self._adapter_names or get_base_model_id(model) != self._base_id:
                raise self._unknown_model(model)
        return model

    def _served(self) -> list[str]:
        return [*self._model_cards, *self._adapter_names]

    def _unknown_model(self, model: str) -> HTTPException:
        # A dict detail carries param and code through to rayapp's OpenAIErrorMiddleware.
        return HTTPException(status.HTTP_404_NOT_FOUND, {
            "message": f"unknown model '{model}'; this deployment serves: {', '.join(self._served())}",
            "param": "model", "code": "model_not_found"})

    async def _get_model_id(self, model):
        if model is not None and model not in self._model_cards and model not in self._adapter_names \
                and ":" not in model:
            raise self._unknown_model(model)
        return await super()._get_model_id(self._full_id(model))

    async def _get_response(self, *, body, call_method, raw_request=None):
        if getattr(body, "model", None):
            body.model = self._full_id(body.model)
        if hasattr(body, "messages"):
            # pydantic validates `messages` lazily; materialise it here so `messages: 5` is a 400, not a
            # replica-side 500.
            try:
                body.messages = list(body.messages)
            except (TypeError, ValueError) as e:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, {"message": f"invalid request body: messages: {e}",
                                                                  "param": "messages", "code": "invalid_type"}) from e
        started = False
        try:
            async for item in super()._get_response(body=body, call_method=call_method, raw_request=raw_request):
                started = True
                yield item
        except (TypeError, ValueError) as e:
            # Fields pydantic validates lazily (e.g. `messages: 5`) fail here, before any output: a bad
            # request, not a server error. Once output has started, errors propagate unchanged.
            if started:
                raise
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"invalid request body: {e}") from e

    async def model(self, model_id: str):
        if model_id in self._model_cards:
            return self._model_cards[model_id]
        name = model_id if model_id in self._adapter_names else None
        if name is None and ":" in model_id and get_base_model_id(model_id) == self._base_id:
            name = get_lora_id(model_id) if get_lora_id(model_id) in self._adapter_names else None
        if name is None:
            return None
        base = self._model_cards[self._base_id]
        return ModelCard(id=name, object="model", owned_by=base.owned_by, permission=list(base.permission),
                         metadata={**base.metadata, "base_model_id": self._base_id, "adapter": name,
                                   "routed_as": f"{self._base_id}:{name}"})

    async def models(self):
        cards = [self._model_cards[self._base_id]]
        cards += [await self.model(name) for name in self._adapter_names]
        return ModelList(data=cards)
