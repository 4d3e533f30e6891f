"""URL block list: domains with their subdomains, banned words as whole URL tokens."""

from dataprep.urlfilter import URLBlockList, URLFilterConfig


def test_blocks_domains_and_subdomains_only():
    block = URLBlockList(["spam.example"], [])
    assert block.reason("https://spam.example/page") == "domain:spam.example"
    assert block.reason("http://www.Spam.Example./x") == "domain:spam.example"
    assert block.reason("https://notspam.example/") is None
    assert block.reason(None) is None


def test_banned_words_match_whole_tokens():
    block = URLBlockList.from_config(URLFilterConfig())
    assert block.reason("https://example.com/free-casino-games") == "word:casino"
    assert block.reason("https://example.com/essex-county") is None  # 'sex' inside a word
    assert URLBlockList([], ["casino"]).reason("https://a.example/CASINO") == "word:casino"
