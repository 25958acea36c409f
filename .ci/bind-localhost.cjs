// Preload for the MCP conformance harness (@modelcontextprotocol/conformance), which has no bind option:
// its mock servers call listen(0) with no host, so they would accept connections on every interface.
// With `node --require ./.ci/bind-localhost.cjs <its dist/index.js> ...`, a TCP listen that names no host
// binds 127.0.0.1 instead; one that names a host, a Unix socket path or a handle is left alone. The URLs the
// harness hands out say http://localhost:<port>, which reaches 127.0.0.1.
'use strict';
const dns = require('dns');
const net = require('net');

const LOOPBACK = '127.0.0.1';

// A listen with a host resolves it through dns.lookup, asynchronously even for an IP literal, and the
// harness reads server.address().port as soon as listen() returns: so the loopback literal is answered
// at once (the callback runs before lookup returns), and the socket is bound by then.
const lookup = dns.lookup;
dns.lookup = function lookupLoopbackAtOnce(hostname, options, callback) {
  if (hostname !== LOOPBACK) return lookup.apply(this, arguments);
  if (typeof options === 'function') [callback, options] = [options, {}];
  if (options && options.all) callback(null, [{ address: LOOPBACK, family: 4 }]);
  else callback(null, LOOPBACK, 4);
  return {};
};

const isPort = (value) => typeof value === 'number' || (typeof value === 'string' && /^\d+$/.test(value));

// listen()'s forms: (port[, host][, backlog][, cb]), (options[, cb]), (path[, backlog][, cb]),
// (handle[, backlog][, cb]), ([cb]); the host goes where it would have been written
function withLoopback(args) {
  const [first, ...rest] = args;
  if (args.length === 0 || typeof first === 'function') return [0, LOOPBACK, ...args];
  if (isPort(first)) {
    if (typeof rest[0] === 'string') return args;  // a host of its own
    if (rest.length > 0 && rest[0] == null) rest.shift();  // (port, undefined, ...)
    return [first, LOOPBACK, ...rest];
  }
  if (first !== null && typeof first === 'object' && first.host == null &&
      !['path', 'fd', 'handle', '_handle'].some((key) => first[key] !== undefined)) {
    return [{ ...first, host: LOOPBACK }, ...rest];
  }
  return args;
}

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function listenOnLoopback(...args) {
  return listen.apply(this, withLoopback(args));
};
