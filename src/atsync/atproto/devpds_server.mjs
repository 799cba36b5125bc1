// Launcher for `atsync dev-pds`: runs a PLC directory and the reference PDS in one Node
// process, both bound to 127.0.0.1 only. Started by atsync/atproto/_devpds.py, which passes:
//   ATSYNC_DEVPDS_INSTALL_DIR  directory whose node_modules holds @atproto/pds and @did-plc/server
//   ATSYNC_DEVPDS_PLC_LOG      JSON-lines file of PLC operations (kept in the data directory)
//   ATSYNC_DEVPDS_PLC_PORT     port for the PLC (0 = any free port)
//   ATSYNC_DEVPDS_PLC_URL      join this PLC directory instead of running one (empty: run one)
//   ATSYNC_DEVPDS_TEMP_DIR     temporary data directory to delete on exit (unset: data is kept)
//   ATSYNC_DEVPDS_OAUTH_TOKEN_TTL_MS  lifetime of OAuth access tokens (unset: the PDS's 1 h)
//   PDS_*                      the PDS's own configuration (readEnv() reads it)
// When both servers listen it prints one line `ATSYNC-DEVPDS {"plc_port":…,"pds_port":…}`
// on stdout. It exits when stdin reaches EOF (the Python parent died or closed the pipe), and
// on SIGTERM/SIGINT.

import fs from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const LOOPBACK = '127.0.0.1'
// http-terminator waits for open connections (firehose subscribers keep theirs open); the
// parent escalates to SIGKILL later, but a bounded self-exit keeps stop() fast.
const SHUTDOWN_GRACE_MS = 5000

const installDir = process.env.ATSYNC_DEVPDS_INSTALL_DIR
const plcLogPath = process.env.ATSYNC_DEVPDS_PLC_LOG
const plcPort = Number(process.env.ATSYNC_DEVPDS_PLC_PORT ?? '0')
const tempDir = process.env.ATSYNC_DEVPDS_TEMP_DIR

let stopping = false
let plcServer
let pdsServer

function fail(message, err) {
  process.stderr.write(`devpds: ${message}${err ? `: ${err.stack ?? err}` : ''}\n`)
  process.exit(1)
}

async function shutdown(reason) {
  if (stopping) return
  stopping = true
  process.stderr.write(`devpds: stopping (${reason})\n`)
  setTimeout(() => process.exit(0), SHUTDOWN_GRACE_MS).unref()
  try {
    await pdsServer?.destroy()
  } catch (err) {
    process.stderr.write(`devpds: PDS shutdown: ${err.stack ?? err}\n`)
  }
  try {
    await plcServer?.destroy()
  } catch (err) {
    process.stderr.write(`devpds: PLC shutdown: ${err.stack ?? err}\n`)
  }
  process.exit(0)
}

// Both servers call `app.listen(port)`, which would bind every interface; pin them to loopback.
function bindToLoopback(app) {
  const listen = app.listen.bind(app)
  app.listen = (port, ...rest) => listen(port, LOOPBACK, ...rest)
}

// The PLC store is in memory. Every accepted operation is appended to a log in the data
// directory and replayed into the fresh store at the next start, so a PDS restarted on kept
// data still finds its DIDs. Appending after the store accepted the operation and before the
// HTTP answer leaves the PDS never relying on an operation that the log lacks.
async function persistPlcOperations(db) {
  if (!plcLogPath) return
  let replayed = 0
  if (fs.existsSync(plcLogPath)) {
    const lines = fs.readFileSync(plcLogPath, 'utf8').split('\n')
    for (const [i, line] of lines.entries()) {
      if (!line.trim()) continue
      let entry
      try {
        entry = JSON.parse(line)
      } catch (err) {
        // Only the last line can be torn (killed mid-append); anything earlier is corruption.
        if (i >= lines.length - 2) break
        throw new Error(`${plcLogPath}:${i + 1}: ${err.message}`)
      }
      await db.validateAndAddOp(entry.did, entry.op)
      replayed += 1
    }
  }
  const fd = fs.openSync(plcLogPath, 'a')
  const add = db.validateAndAddOp.bind(db)
  db.validateAndAddOp = async (did, op) => {
    await add(did, op)
    fs.writeSync(fd, JSON.stringify({ did, op }) + '\n')
    fs.fsyncSync(fd)
  }
  return replayed
}

async function main() {
  if (!installDir) fail('ATSYNC_DEVPDS_INSTALL_DIR is not set')
  // The packages live in the install cache, not beside this file, so resolve from there.
  const requireFromInstall = createRequire(path.join(installDir, 'package.json'))
  const plc = requireFromInstall('@did-plc/server')
  const pdsModule = await import(pathToFileURL(requireFromInstall.resolve('@atproto/pds')).href)
  const { PDS, envToCfg, envToSecrets, readEnv } = pdsModule

  let actualPlcPort = null
  let replayed = 0
  let didPlcUrl = process.env.ATSYNC_DEVPDS_PLC_URL || ''
  if (!didPlcUrl) {
    const db = plc.Database.mock()
    replayed = await persistPlcOperations(db)
    plcServer = plc.PlcServer.create({ db, port: plcPort })
    bindToLoopback(plcServer.app)
    const plcHttp = await plcServer.start()
    actualPlcPort = plcHttp.address().port
    didPlcUrl = `http://${LOOPBACK}:${actualPlcPort}`
  }
  if (stopping) return

  const env = readEnv()
  // By name: the PDS resolves DIDs with a fetch that refuses IP literals, so a directory at
  // 127.0.0.1 cannot be read back (an account moving in from another host fails its
  // createAccount). localhost is the same loopback directory.
  env.didPlcUrl = didPlcUrl.replace(`//${LOOPBACK}:`, '//localhost:')
  pdsServer = await PDS.create(envToCfg(env), envToSecrets(env))
  bindToLoopback(pdsServer.app)
  // The PDS has no setting for it; tests that watch an access token expire on the server
  // shorten it on the provider's token manager, which reads it for every token it issues.
  const tokenTtl = Number(process.env.ATSYNC_DEVPDS_OAUTH_TOKEN_TTL_MS || '0')
  if (tokenTtl > 0) {
    const manager = pdsServer.ctx.oauthProvider?.tokenManager
    if (!manager || typeof manager.tokenMaxAge !== 'number') {
      fail('ATSYNC_DEVPDS_OAUTH_TOKEN_TTL_MS: this PDS has no OAuth token manager to configure')
    }
    manager.tokenMaxAge = tokenTtl
  }
  const pdsHttp = await pdsServer.start()
  if (stopping) return

  const ready = { plc_port: actualPlcPort, pds_port: pdsHttp.address().port, replayed }
  process.stdout.write(`ATSYNC-DEVPDS ${JSON.stringify(ready)}\n`)
}

// Python removes it too, but not when it was killed; then only this process is left to.
process.on('exit', () => {
  if (tempDir) fs.rmSync(tempDir, { recursive: true, force: true })
})
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
process.stdin.on('end', () => shutdown('parent gone'))
process.stdin.on('error', () => shutdown('parent gone'))
process.stdin.resume()

main().catch((err) => fail('start failed', err))
