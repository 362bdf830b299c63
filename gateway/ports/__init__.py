"""Published ports: a sandbox's TCP ports served at `/v1/sandboxes/{id}/ports/{port}/` through the
gateway's authenticated proxy (registry, the agent-channel tunnel, the HTTP and WebSocket proxies;
the routes are gateway/web/rest_ports.py)."""
