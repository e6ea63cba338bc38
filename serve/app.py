"""The Serve application: `app_builder` turns typed arguments into the aigc Serve app.

    serve run serve.app:app_builder model_dir=/path/to/winner                  # from the repository root
    serve run serve.app:app_builder model_dir=DIR autoscaling.max_replicas=4 num_gpus=1
    serve run serve/config.yaml                 # a local Ray, with the Serve config file
    serve deploy serve/config.yaml              # a running cluster (`ray up cluster.yaml`, `ray start --head`)
    aigc serve --model DIR                      # the same app from aigc's command line

Arguments are `aigc.serving.args.ServeArgs` fields: flat `a.b=value` strings from `serve run`, or the nested
`args:` mapping of serve/config.yaml. Unknown keys and bad values fail before anything is deployed.
"""

from aigc.serving.app import app_builder, build_app
from aigc.serving.args import ServeArgs

__all__ = ["ServeArgs", "app_builder", "build_app"]
