"""Kestrel as a Ray Serve application: one deployment per model of a repository, each replica running
Kestrel's backend behind its dynamic batcher; ensembles fused by the ingress from their members'
deployments (called concurrently); an ingress speaking `python -m serve`'s APIs (KServe V2 REST and
POST /v1/classify over Ray Serve's HTTP proxy, KServe V2 gRPC and Classify over its gRPC proxy).

    serve run deploy.ray.app:build_app repository=models ensemble=imagenet=mobilenet_v2,mobilenet_v2_int8
    serve deploy deploy/ray/serve_config.yaml

`import deploy.ray.app` does not import Ray (the deployments are built by build_app); docs/scaling.md.
"""
