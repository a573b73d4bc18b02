"""The registry zoo: the registries people pull from, reproduced as small in-process
servers, so that tests pull through proxyd with a real client (skopeo) and see what
each registry saw.

Each registry has a module of its own, whose docstring names the public document or
source file every behaviour comes from, and says so where a fact could not be found:

- `dockerhub`: registry-1.docker.io, its token service on another host (auth.docker.io),
  its pull rate limit, blobs from a CDN;
- `ghcr`: ghcr.io's anonymous token flow, blobs from another host;
- `ecr`: an ECR registry's Basic auth with 12-hour passwords from a credential helper,
  layers from S3;
- `harbor`: a Harbor proxy-cache project, served under the project's path.

What they share: `registry` (distribution's pull API over a few images, every request
recorded), `tokens` (a token service in the shape of distribution's token spec) and
`storage` (the blob storage a registry redirects to, reached by signed URLs, refusing
the registry's credentials). Every server listens on 127.0.0.1 on a port of its own,
is started by a fixture (tests/zoo/conftest.py) and stopped with the test.

The chain proxyd -> proxyd -> distribution, where the first forwards `ns=`, runs
against the real distribution: tests/e2e/test_chain_of_proxyds.py.
"""
