"""The control socket, both ends and knowing no Job: the verb registry (verbs), the wire format
(protocol), the asyncio server the daemon runs (server) and the blocking client the CLI uses
(client). `trainsup status` imports protocol and client only."""
