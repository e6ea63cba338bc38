"""Serve a model directory on Ray Serve behind an OpenAI-compatible HTTP API.

One concern per module, lightest first (each imports only those above it):

    args        ServeArgs and its parts, parse_args, deployment_options, model ids  (pydantic only: no Ray, torch or FastAPI)
    adapters    the LoRA adapters an app serves on its base: listed, in the adapter folder, checked against the base
    moderation  the moderation hook (Moderator, BlockList, load_moderator)
    api         the OpenAI wire format: ApiError, request models, authorize, parse_completion, response builders
    metrics     the replica's Prometheus metrics (ray.serve.metrics)
    engine      BatchingEngine: continuous batching over aigc.generation.BatchStream, behind CompletionEngine;
                AdapterHost: a decode batch per adapter on one base model
    app         the model deployment (ModelServer) with its routes, the Router in front of it when adapters are
                served, build_app, app_builder and `aigc serve`

This file stays empty of imports so that `aigc.serving.args` loads without FastAPI, Ray or torch.
"""
