"""Where the stages run and where sessions are stored: local (one box) and ray (Ray Serve, PostgreSQL + S3)."""
