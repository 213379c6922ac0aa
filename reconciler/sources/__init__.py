"""Sources of desired state: a commit of a git repository (the normal case) or a folder (a preview)."""
