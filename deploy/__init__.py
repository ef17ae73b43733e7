"""Running Kestrel beyond one process: the container image (deploy/docker), Kubernetes and KServe
manifests (deploy/k8s) and a Ray Serve application (deploy/ray). Builds on serve's public pieces;
serve never imports it. See docs/scaling.md."""
