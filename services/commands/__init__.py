"""The `biogate` command groups, one module each (register(subparsers)), above the services: they
may import any service, the services and services/common import none of them."""
