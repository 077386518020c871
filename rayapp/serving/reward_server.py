"""The reward-model deployment (imported only where it is built: FastAPI, torch, transformers).

``POST /v1/score`` with ``{"model": NAME, "input": [TEXT | [MESSAGE, ...], ...]}`` returns
``{"object": "list", "model": NAME, "data": [{"index": i, "score": r_i}]}``: the scalar reward
of each text (conversations are rendered with the tokenizer's chat template). RLHF jobs whose
reward model runs elsewhere score over HTTP this way. ``GET /v1/models`` lists the model.
Batches are scored in one padded forward pass under ``torch.inference_mode``.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

MAX_INPUTS = 256


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="The served reward model's name (optional: there is one).")
    input: list[str | list[Message]] = Field(..., min_length=1, max_length=MAX_INPUTS,
                                             description="Texts, or conversations as lists of messages.")


async def _bad_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ("body",)}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse(status_code=400, content={"error": {
        "message": f"invalid request: {where}: {first.get('msg')}", "type": "invalid_request_error",
        "param": where, "code": 400}})


class RewardScorer:
    """Loads the reward model once per replica and scores batches (the HTTP routes are added per app)."""

    def __init__(self, model_dir, name: str, max_length: int = 512):
        """``model_dir``: a local directory, or an OutputStore of a URI (downloaded into this node's cache)."""
        import torch

        if hasattr(model_dir, "fetch_dir"):
            model_dir = str(model_dir.fetch_dir())

        from rayapp.models.io import load_tokenizer
        from rayapp.models.value_head import load_reward_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.name, self.max_length = name, max_length
        self.tokenizer = load_tokenizer(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = load_reward_model(model_dir, pad_token_id=self.tokenizer.pad_token_id).eval()
        from rayapp.data.tokenize import trained_chat_template

        self.chat_template = trained_chat_template(model_dir)  # 'never': plain text, as it was trained

    def _ids(self, item) -> list[int]:
        """The tokens the reward model saw in training for such an input: a text row with the
        tokenizer's special tokens; a conversation rendered under its job's data.chat_template."""
        if isinstance(item, str):
            return self.tokenizer(item, add_special_tokens=True)["input_ids"]
        from rayapp.data.tokenize import render_conversation

        text = render_conversation(self.tokenizer, [m.model_dump() for m in item], self.chat_template)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "rayapp",
                                            "metadata": {"kind": "reward", "max_length": self.max_length}}]}

    def score_batch(self, body: ScoreRequest) -> dict:
        import torch

        from rayapp.models.value_head import reward_scores

        if body.model is not None and body.model != self.name:
            raise HTTPException(404, f"unknown model '{body.model}'; this endpoint serves '{self.name}'")
        ids = [self._ids(item) for item in body.input]
        truncated = [len(x) > self.max_length for x in ids]
        batch = self.tokenizer.pad({"input_ids": [x[: self.max_length] for x in ids]}, return_tensors="pt")
        with torch.inference_mode():
            scores = reward_scores(self.model, batch["input_ids"], batch["attention_mask"])  # (B,)
        return {"object": "list", "model": self.name,
                "data": [{"index": i, "score": float(s), "truncated": t}
                         for i, (s, t) in enumerate(zip(scores.tolist(), truncated, strict=True))]}


def build_reward_deployment(key_sha256: str | None = None, limits=None):
    """The Serve deployment class with its own FastAPI app: errors in OpenAI's shape, a body over
    ``limits.max_body_bytes`` (a :class:`rayapp.serving.app.RequestLimits`) refused with a 413
    before it is read whole, and the API key checked first when a key digest is given.

    Built per deploy, not at import: Ray pickles this class by value together with its app, so the
    middlewares travel with it (a module-level app would be re-imported bare on the replica)."""
    from rayapp.serving.app import APIKeyMiddleware, OpenAIErrorMiddleware, RequestLimitsMiddleware

    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _bad_request)
    if limits is not None:
        app.add_middleware(RequestLimitsMiddleware, limits=limits)
    app.add_middleware(OpenAIErrorMiddleware)
    if key_sha256:
        app.add_middleware(APIKeyMiddleware, key_sha256=key_sha256)

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    @serve.ingress(app)
    class RewardModelDeployment(RewardScorer):
        @app.get("/v1/models")
        def models(self):
            return self.list_models()

        @app.post("/v1/score")
        def score(self, body: ScoreRequest):
            return self.score_batch(body)

    return RewardModelDeployment
