"""Generated from ../proto/csi.proto by nbd_agent.csi.generate."""
