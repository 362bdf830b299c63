"""Sandboxes as the gateway keeps them: the model (`sandbox`), admission of creates (`admission`),
lifecycle (`manager`), routing of ops to the agent (`routing`), exec streams (`execs`) and their
replay buffers (`replay`)."""
