"""PopAlign ComfyUI nodes: thin wrappers over popalign_core (the node pack lands with its own issue).

Node ids are prefixed `PopAlign` and never renamed once shipped: saved workflows depend on them.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
