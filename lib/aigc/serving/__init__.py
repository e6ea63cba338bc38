"""Serve a model directory on Ray Serve behind an OpenAI-compatible HTTP API.

One concern per module, lightest first (each imports only those above it):

    args        ServeArgs and its parts, parse_args, deployment_options  (pydantic only: no Ray, torch or FastAPI)
    moderation  the moderation hook (Moderator, BlockList, load_moderator)
    api         the OpenAI wire format: ApiError, request models, authorize, parse_completion, response builders
    metrics     the replica's Prometheus metrics (ray.serve.metrics)
    engine      BatchingEngine: continuous batching over aigc.generation.BatchStream, behind CompletionEngine
    app         the one Serve deployment (ModelServer) with its routes, build_app, app_builder and `aigc serve`

This file stays empty of imports so that `aigc.serving.args` loads without FastAPI, Ray or torch.
"""
