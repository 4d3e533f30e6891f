"""The polite web crawler: URL rules, robots.txt, address safety, fetching, WARC output, resumable state."""
