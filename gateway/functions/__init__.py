"""Serverless operations over exec records: invoke and test runs (`calls`, with the sources of
`harness`), deployed functions and their instances (`deployed`), and the per-tenant code cache
(`code_cache`). docs/functions.md describes them for users."""
