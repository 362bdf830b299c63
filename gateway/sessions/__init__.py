"""Sandboxes, tenants, quotas, lifecycle, exec streams and their replay buffers."""
