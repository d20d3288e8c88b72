"""ComfyUI entry point of the PopAlign node pack (ComfyUI imports this folder as a package from custom_nodes/).

The node classes live in `nodes/`, thin wrappers over the standalone `popalign_core` package. Imports are guarded so
that importing this file outside ComfyUI (e.g. during pytest collection) never fails.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./js"

if __package__:  # imported as a package (ComfyUI custom_nodes/): load the node pack
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except Exception as exc:  # one broken import must not take ComfyUI down; say why
        import logging

        logging.getLogger("popalign").error("PopAlign nodes failed to load: %s", exc, exc_info=True)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
