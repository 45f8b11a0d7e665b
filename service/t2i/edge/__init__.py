"""Running the Envoy edge (edge/envoy.yaml) locally: its descriptor set, a local copy of its
config, and `t2i up`, which starts the service and Envoy together."""
