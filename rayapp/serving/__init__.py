"""Serving tuned models on Ray Serve (``ray.serve.llm``): the OpenAI app, auth, deploy helpers, local head."""
