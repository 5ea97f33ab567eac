"""A blinded reader study: clinicians score real and synthetic images on 1-5 scales in a browser.

`create` picks slices and writes the study folder (images under opaque ids, the key apart),
`server` serves it to readers on the loopback interface and stores every answer in SQLite at once,
`analyse` unblinds the answers with the key and writes the report.
"""
