// Generated from guest_agent/schema.py by `python -m gateway.protocol`: do not edit.
// tests/protocol/test_schema.py fails when this file and the schema drift.
export const PROTOCOL = {
 "bearer_prefix": "sandgate.bearer.",
 "binary_fields": [
  "ca_pem",
  "data",
  "entropy",
  "stdin"
 ],
 "close_codes": {
  "destroyed": 4404,
  "going_away": 1001,
  "protocol_error": 4400,
  "too_slow": 4408
 },
 "display": {
  "base64_types": [
   "image/png",
   "image/jpeg"
  ],
  "max_bundle_bytes": 983040,
  "max_exec_bytes": 16777216,
  "max_types": 16
 },
 "errors": {
  "bad_frame": {
   "http": 400,
   "retryable": false
  },
  "bad_request": {
   "http": 400,
   "retryable": false
  },
  "busy": {
   "http": 409,
   "retryable": true
  },
  "disk_quota": {
   "http": 507,
   "retryable": false
  },
  "exists": {
   "http": 409,
   "retryable": false
  },
  "forbidden": {
   "http": 403,
   "retryable": false
  },
  "forbidden_origin": {
   "http": 403,
   "retryable": false
  },
  "frame_too_large": {
   "http": 413,
   "retryable": false
  },
  "guest_died": {
   "http": 502,
   "retryable": true
  },
  "guest_protocol": {
   "http": 502,
   "retryable": false
  },
  "internal": {
   "http": 500,
   "retryable": true
  },
  "io_error": {
   "http": 500,
   "retryable": false
  },
  "is_a_directory": {
   "http": 400,
   "retryable": false
  },
  "not_a_directory": {
   "http": 400,
   "retryable": false
  },
  "not_found": {
   "http": 404,
   "retryable": false
  },
  "path_escape": {
   "http": 400,
   "retryable": false
  },
  "quota_exceeded": {
   "http": 429,
   "retryable": true
  },
  "timeout": {
   "http": 504,
   "retryable": false
  },
  "unauthorized": {
   "http": 401,
   "retryable": false
  },
  "unavailable": {
   "http": 503,
   "retryable": true
  },
  "unknown_op": {
   "http": 400,
   "retryable": false
  },
  "unsupported": {
   "http": 501,
   "retryable": false
  }
 },
 "max_message": 1048576,
 "ops": {
  "exec.attach": {
   "capability": null,
   "control": false,
   "fields": {
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "from_seq": {
     "default": 0,
     "min": 0,
     "required": false,
     "type": "int"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "client",
   "liveness": false,
   "nested": false,
   "stream": true
  },
  "exec.close_stdin": {
   "capability": "exec.stdin",
   "control": true,
   "fields": {
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "exec.input": {
   "capability": "exec.stdin",
   "control": true,
   "fields": {
    "data": {
     "max": 524288,
     "required": true,
     "type": "bin"
    },
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "exec.list": {
   "capability": null,
   "control": false,
   "fields": {},
   "idempotent": true,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "exec.resize": {
   "capability": "exec.pty",
   "control": true,
   "fields": {
    "cols": {
     "max": 65535,
     "min": 1,
     "required": true,
     "type": "int"
    },
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "rows": {
     "max": 65535,
     "min": 1,
     "required": true,
     "type": "int"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "exec.signal": {
   "capability": "exec.signal",
   "control": true,
   "fields": {
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "signal": {
     "max": 64,
     "min": 1,
     "required": true,
     "type": "str | int"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "exec.start": {
   "capability": null,
   "control": false,
   "fields": {
    "code": {
     "required": false,
     "type": "str"
    },
    "code_ref": {
     "leg": "client",
     "max": 64,
     "min": 64,
     "required": false,
     "type": "str"
    },
    "command": {
     "min": 1,
     "required": false,
     "type": "list | str"
    },
    "cwd": {
     "max": 4096,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "env": {
     "max": 4096,
     "required": false,
     "type": "map"
    },
    "exec_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "language": {
     "max": 32,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "namespace": {
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "pty": {
     "required": false,
     "type": "map"
    },
    "stdin": {
     "required": false,
     "type": "bin"
    },
    "stdin_open": {
     "required": false,
     "type": "bool"
    },
    "tag": {
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "timeout": {
     "min": 0.001,
     "required": false,
     "type": "float"
    },
    "track_files": {
     "required": false,
     "type": "bool"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": true
  },
  "fs.changes": {
   "capability": "fs",
   "control": false,
   "fields": {
    "advance": {
     "leg": "agent",
     "max": 100000,
     "required": false,
     "type": "list"
    },
    "base": {
     "default": false,
     "leg": "agent",
     "required": false,
     "type": "bool"
    },
    "keep": {
     "leg": "agent",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "since": {
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "track": {
     "leg": "agent",
     "max": 64,
     "required": false,
     "type": "list"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.list": {
   "capability": "fs",
   "control": false,
   "fields": {
    "depth": {
     "default": 1,
     "max": 16,
     "min": 1,
     "required": false,
     "type": "int"
    },
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": true,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.mkdir": {
   "capability": "fs",
   "control": false,
   "fields": {
    "parents": {
     "default": true,
     "required": false,
     "type": "bool"
    },
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.move": {
   "capability": "fs",
   "control": false,
   "fields": {
    "dst": {
     "max": 4096,
     "required": true,
     "type": "str"
    },
    "src": {
     "max": 4096,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.patch": {
   "capability": "fs",
   "control": false,
   "fields": {
    "action": {
     "required": true,
     "type": "str"
    },
    "data": {
     "max": 524288,
     "required": false,
     "type": "bin"
    },
    "mode": {
     "max": 4095,
     "min": 0,
     "required": false,
     "type": "int"
    },
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    },
    "src": {
     "max": 4096,
     "required": false,
     "type": "str"
    },
    "target": {
     "max": 4096,
     "required": false,
     "type": "str"
    },
    "text": {
     "max": 524288,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.read": {
   "capability": "fs",
   "control": false,
   "fields": {
    "length": {
     "min": 0,
     "required": false,
     "type": "int"
    },
    "offset": {
     "default": 0,
     "min": 0,
     "required": false,
     "type": "int"
    },
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": true,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": true
  },
  "fs.remove": {
   "capability": "fs",
   "control": false,
   "fields": {
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    },
    "recursive": {
     "default": false,
     "required": false,
     "type": "bool"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.stat": {
   "capability": "fs",
   "control": false,
   "fields": {
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": true,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "fs.unwatch": {
   "capability": "fs.watch",
   "control": false,
   "fields": {
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "watch_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "fs.watch": {
   "capability": "fs.watch",
   "control": false,
   "fields": {
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    },
    "poll_interval": {
     "default": 0.5,
     "max": 60.0,
     "min": 0.05,
     "required": false,
     "type": "float"
    },
    "recursive": {
     "default": false,
     "required": false,
     "type": "bool"
    },
    "tag": {
     "leg": "client",
     "max": 128,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "watch_id": {
     "max": 64,
     "min": 1,
     "required": false,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": true
  },
  "fs.write": {
   "capability": "fs",
   "control": false,
   "fields": {
    "data": {
     "max": 524288,
     "required": true,
     "type": "bin"
    },
    "offset": {
     "default": 0,
     "min": 0,
     "required": false,
     "type": "int"
    },
    "path": {
     "max": 4096,
     "required": true,
     "type": "str"
    },
    "truncate": {
     "default": false,
     "required": false,
     "type": "bool"
    }
   },
   "idempotent": false,
   "leg": "both",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "guest.env": {
   "capability": null,
   "control": false,
   "fields": {
    "ca_pem": {
     "max": 65536,
     "required": false,
     "type": "bin"
    },
    "set": {
     "default": {},
     "max": 64,
     "required": false,
     "type": "map"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "guest.setup": {
   "capability": "guest.setup",
   "control": false,
   "fields": {
    "disk_bytes": {
     "min": 1,
     "required": false,
     "type": "int"
    },
    "entropy": {
     "max": 512,
     "min": 16,
     "required": false,
     "type": "bin"
    },
    "memory_bytes": {
     "min": 1,
     "required": false,
     "type": "int"
    },
    "pids": {
     "min": 1,
     "required": false,
     "type": "int"
    },
    "time_ns": {
     "min": 0,
     "required": false,
     "type": "int"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "hello": {
   "capability": null,
   "control": false,
   "fields": {
    "version": {
     "required": true,
     "type": "int"
    }
   },
   "idempotent": true,
   "leg": "both",
   "liveness": true,
   "nested": true,
   "stream": false
  },
  "invoke": {
   "capability": null,
   "control": false,
   "fields": {
    "args": {
     "default": [],
     "required": false,
     "type": "list"
    },
    "code": {
     "required": false,
     "type": "str"
    },
    "code_ref": {
     "leg": "client",
     "max": 64,
     "min": 64,
     "required": false,
     "type": "str"
    },
    "files": {
     "required": false,
     "type": "map"
    },
    "function": {
     "max": 128,
     "min": 1,
     "required": true,
     "type": "str"
    },
    "kwargs": {
     "default": {},
     "required": false,
     "type": "map"
    },
    "language": {
     "default": "python",
     "max": 32,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "timeout": {
     "min": 0.001,
     "required": false,
     "type": "float"
    }
   },
   "idempotent": false,
   "leg": "client",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "metrics": {
   "capability": "metrics",
   "control": false,
   "fields": {},
   "idempotent": true,
   "leg": "both",
   "liveness": false,
   "nested": true,
   "stream": false
  },
  "net.close": {
   "capability": "net.connect",
   "control": false,
   "fields": {
    "conn_id": {
     "max": 64,
     "min": 1,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "net.connect": {
   "capability": "net.connect",
   "control": false,
   "fields": {
    "conn_id": {
     "max": 64,
     "min": 1,
     "required": true,
     "type": "str"
    },
    "port": {
     "max": 65535,
     "min": 1,
     "required": true,
     "type": "int"
    },
    "window": {
     "default": 262144,
     "max": 16777216,
     "min": 65536,
     "required": false,
     "type": "int"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": true
  },
  "net.credit": {
   "capability": "net.connect",
   "control": false,
   "fields": {
    "bytes": {
     "max": 16777216,
     "min": 1,
     "required": true,
     "type": "int"
    },
    "conn_id": {
     "max": 64,
     "min": 1,
     "required": true,
     "type": "str"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "net.send": {
   "capability": "net.connect",
   "control": false,
   "fields": {
    "conn_id": {
     "max": 64,
     "min": 1,
     "required": true,
     "type": "str"
    },
    "data": {
     "max": 524288,
     "required": false,
     "type": "bin"
    },
    "eof": {
     "default": false,
     "required": false,
     "type": "bool"
    }
   },
   "idempotent": false,
   "leg": "agent",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "ping": {
   "capability": null,
   "control": false,
   "fields": {},
   "idempotent": true,
   "leg": "both",
   "liveness": true,
   "nested": true,
   "stream": false
  },
  "sandbox.destroy": {
   "capability": null,
   "control": false,
   "fields": {},
   "idempotent": false,
   "leg": "client",
   "liveness": false,
   "nested": false,
   "stream": false
  },
  "sandbox.info": {
   "capability": null,
   "control": false,
   "fields": {},
   "idempotent": true,
   "leg": "client",
   "liveness": true,
   "nested": false,
   "stream": false
  },
  "test": {
   "capability": null,
   "control": false,
   "fields": {
    "code": {
     "required": false,
     "type": "str"
    },
    "code_ref": {
     "leg": "client",
     "max": 64,
     "min": 64,
     "required": false,
     "type": "str"
    },
    "language": {
     "default": "python",
     "max": 32,
     "min": 1,
     "required": false,
     "type": "str"
    },
    "tests": {
     "required": true,
     "type": "str"
    },
    "timeout": {
     "min": 0.001,
     "required": false,
     "type": "float"
    }
   },
   "idempotent": false,
   "leg": "client",
   "liveness": false,
   "nested": false,
   "stream": false
  }
 },
 "subprotocols": [
  "sandgate.v1.json",
  "sandgate.v1.msgpack"
 ],
 "version": 1
};
