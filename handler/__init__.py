"""oclaw entry points: the HTTP app, the server CLI (and, later, the Lambda handler)."""
