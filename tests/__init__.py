# The signing key of the test run and of the servers and workers tests start.
TEST_SECRET_KEY = "tests-only-secret-key-not-for-production-0123456789abcdefghijklmnop"
