# syntax=docker/dockerfile:1.7
# Envoy edge (REST/JSON -> gRPC) with its config, the generated descriptor set and the playground page.
#
#   k8s/render.sh --descriptor    # writes k8s/base/generated/text_to_image.pb from proto/
#   docker build -f docker/edge.Dockerfile -t REGISTRY/t2i-edge:TAG .
#
# In Kubernetes all of them are mounted over /etc/envoy from ConfigMaps (k8s/base), so a config
# change does not need a new image; the copies here make the image usable on its own.
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0
FROM ${ENVOY_IMAGE}
COPY --chmod=0444 edge/envoy.yaml /etc/envoy/envoy.yaml
COPY --chmod=0444 k8s/base/generated/text_to_image.pb /etc/envoy/text_to_image.pb
# The playground page edge/envoy.yaml serves at GET / (named one by one, so that --chmod applies
# to the files only, never to a folder).
COPY --chmod=0444 edge/playground/index.html edge/playground/playground.js edge/playground/playground.css /etc/envoy/playground/
# Any non-root id works: Envoy only reads /etc/envoy and logs to stdout.
USER 10101:10101
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["--config-path", "/etc/envoy/envoy.yaml", "--disable-hot-restart"]
