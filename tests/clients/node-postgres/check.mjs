// node-postgres (pg, pg-cursor, pg-copy-streams) through pgfan: the checks of
// tests/clients/README.md, run against PGFAN_CLIENT_TLS_URL, PGFAN_CLIENT_PLAIN_URL and
// PGFAN_CLIENT_DIRECT_URL in turn. For each target it checks:
//   - TLS is (or is not) in use on the client's socket (TLS verified against PGFAN_CLIENT_CA);
//   - typed results over the common types, by the simple protocol, by the extended protocol
//     and with `binary: true` (pg binary parsers; raw values equal to a direct query);
//   - a fan-out aggregate and a fan-out scan (literal and $1 forms, text and binary results)
//     equal to the same query on a direct connection; through pgfan `EXPLAIN FANOUT` (with the
//     same $1 binding) shows `FanOut:` first and pgfan_queries_total{route="fanout"} rises by one;
//   - named prepared statements ({name, text, values}) run several times, named on the server;
//   - batches: many queries issued at once on one client (queued), and on a `pipeline: true`
//     client (a Sync per query, all in flight) with two failing 1/0 among them (their 22012
//     must not disturb the others);
//   - pg-cursor read(N) (Execute with max_rows): the count and sum of all rows;
//   - COPY FROM STDIN into a temporary table and COPY TO STDOUT, checked row by row;
//   - a transaction with rollback (a fan-out candidate inside it sees the uncommitted row);
//   - SELECT 1/0 gives err.code 22012 (simple and extended) and the client stays usable.
// Numbers are compared as the strings pg returns (int8 and numeric), never as JS floats.
// Exits non-zero on the first failed check.
import { createRequire } from 'node:module'
import { pipeline } from 'node:stream/promises'
import { Readable } from 'node:stream'
import assert from 'node:assert/strict'

const require = createRequire(process.env.PGFAN_NODE_MODULES + '/')
const pg = require('pg')
const Cursor = require('pg-cursor')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

const env = (k) => process.env[k] ?? fail(`${k} is not set (run through tests/clients/run)`)
const TARGETS = [
  ['tls', env('PGFAN_CLIENT_TLS_URL')],
  ['plain', env('PGFAN_CLIENT_PLAIN_URL')],
  ['direct', env('PGFAN_CLIENT_DIRECT_URL')],
]
const CA = env('PGFAN_CLIENT_CA')

const AGG = 'SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts'
const AGG_LIT = `${AGG} GROUP BY grp ORDER BY grp`
const AGG_PARAM = `${AGG} WHERE grp >= $1 GROUP BY grp ORDER BY grp`
const SCAN_LIT = 'SELECT id, amount, label FROM client_facts WHERE qty < 5'
const SCAN_PARAM = 'SELECT id, amount, label FROM client_facts WHERE qty < $1'

function fail(msg) {
  throw new Error(msg)
}

let target = ''
let checks = 0
async function check(name, fn) {
  const t0 = Date.now()
  let timer
  try {
    const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('no answer after 120 s')), 120_000) })
    await Promise.race([fn(), timeout])
  } catch (e) {
    e.message = `[${target}] ${name}: ${e.message}`
    throw e
  } finally {
    clearTimeout(timer)
  }
  checks++
  console.log(`ok   [${target}] ${name} (${Date.now() - t0} ms)`)
}

// A printable, exactly comparable form of a decoded value.
function norm(v) {
  if (v === null || v === undefined) return v
  if (v instanceof Date) return `Date(${v.toISOString()})`
  if (Buffer.isBuffer(v)) return `\\x${v.toString('hex')}`
  if (Array.isArray(v)) return v.map(norm)
  if (typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]))
  return v
}
function same(actual, expected, what) {
  assert.deepStrictEqual(norm(actual), norm(expected), what)
}
const byId = (a, b) => (BigInt(a.id) < BigInt(b.id) ? -1 : BigInt(a.id) > BigInt(b.id) ? 1 : 0)
// Every value as pg hands it to a type parser (a Buffer for binary columns, after the utf-8
// round trip described at BINARY): binary results are compared so with a direct query.
const RAW = { getTypeParser: () => (v) => v }

function connect(url, extra = {}) {
  // sslmode=require would make pg verify against the system CAs: verify against our CA instead.
  const connectionString = url.replace('sslmode=require', `sslmode=verify-full&sslrootcert=${encodeURIComponent(CA)}`)
  return new pg.Client({ connectionString, ...extra })
}

// pgfan_queries_total{route="fanout"}: pgfan counts a statement just after its answer went
// out, so this waits (up to 2 s) for the counter to reach atLeast.
async function fanoutCount(atLeast = 0) {
  let n = 0
  for (let i = 0; i < 40; i++) {
    const text = await (await fetch(env('PGFAN_CLIENT_METRICS_URL'))).text()
    n = Number(/^pgfan_queries_total\{route="fanout"\} (\d+)/m.exec(text)?.[1] ?? 0)
    if (n >= atLeast) break
    await new Promise((r) => setTimeout(r, 50))
  }
  return n
}
async function fannedOut(viaPgfan, fn) {
  if (!viaPgfan) return fn()
  const before = await fanoutCount()
  const result = await fn()
  const n = (await fanoutCount(before + 1)) - before
  if (n !== 1) fail(`pgfan_queries_total{route="fanout"} rose by ${n}, want 1`)
  return result
}

async function explainFanout(c, sql, values) {
  const r = await c.query({ text: `EXPLAIN FANOUT ${sql}`, values, rowMode: 'array' })
  const first = r.rows[0]?.[0]
  if (typeof first !== 'string' || !first.startsWith('FanOut:'))
    fail(`EXPLAIN FANOUT ${sql}: first row is ${JSON.stringify(first)}, want "FanOut: ..." (all rows: ${JSON.stringify(r.rows)})`)
}

const TYPED = `SELECT true AS b, 32767::int2 AS i2, (-2147483648)::int4 AS i4, 9007199254740993::int8 AS i8,
  12345.6789::numeric AS num, 1.50::numeric(12,2) AS num2, 1.5::float4 AS f4, 0.1::float8 AS f8,
  'héllo ✓'::text AS t, 'abc'::varchar(10) AS vc, '\\xdeadbeef00'::bytea AS ba,
  date '2024-02-29' AS d, time '13:45:56.789' AS tm, timestamp '2024-02-29 13:45:56.789' AS ts,
  timestamptz '2024-02-29 13:45:56.789+02' AS tstz, interval '1 day 02:03:04.5' AS iv,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '{"a": [1, "x"]}'::json AS j,
  '{"c": true, "b": null}'::jsonb AS jb, ARRAY[1, NULL, 3]::int[] AS ia,
  ARRAY['x', 'y z', '"q"']::text[] AS ta, NULL::int AS n`
const TYPED_EXPECT = {
  b: true, i2: 32767, i4: -2147483648, i8: '9007199254740993', num: '12345.6789', num2: '1.50',
  f4: 1.5, f8: 0.1, t: 'héllo ✓', vc: 'abc', ba: Buffer.from('deadbeef00', 'hex'),
  d: new Date('2024-02-29T00:00:00Z'), // TZ=UTC (set by ./run): pg makes dates local midnight
  tm: '13:45:56.789', ts: new Date('2024-02-29T13:45:56.789Z'), tstz: new Date('2024-02-29T11:45:56.789Z'),
  iv: { days: 1, hours: 2, minutes: 3, seconds: 4, milliseconds: 500 },
  u: 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', j: { a: [1, 'x'] }, jb: { b: null, c: true },
  ia: [1, null, 3], ta: ['x', 'y z', '"q"'], n: null,
}
// pg 8.23 decodes every DataRow field as utf-8 before handing binary columns to the binary
// parsers (node-postgres issue #3495), so only values whose binary form is valid utf-8 come
// back intact: these are chosen so, and decoded by pg-types' binary parsers.
const BINARY = `SELECT true AS b, 100::int2 AS i2, 1073741825::int4 AS i4, 9007199254740993::int8 AS i8,
  100.01::numeric AS num, 2::float4 AS f4, 2::float8 AS f8, 'héllo ✓'::text AS t,
  timestamp '2000-01-01 00:00' AS ts, timestamptz '2000-01-01 00:00:01+00' AS tstz,
  ARRAY[1, 2, 3]::int[] AS ia, ARRAY['x', 'y z', '"q"']::text[] AS ta, NULL::int AS n`
const BINARY_EXPECT = {
  b: true, i2: 100, i4: 1073741825, i8: '9007199254740993', num: 100.01, f4: 2, f8: 2, t: 'héllo ✓',
  ts: new Date('2000-01-01T00:00:00Z'), tstz: new Date('2000-01-01T00:00:01Z'), ia: [1, 2, 3], ta: ['x', 'y z', '"q"'], n: null,
}

async function runTarget(name, url) {
  target = name
  const viaPgfan = name !== 'direct'
  const ref = connect(env('PGFAN_CLIENT_DIRECT_URL'))
  const c = connect(url)
  await ref.connect()
  await check('connect', () => c.connect())
  try {
    await check(`socket is ${name === 'tls' ? '' : 'not '}TLS`, () => {
      const proto = c.connection.stream.getProtocol?.() ?? null
      if (name === 'tls' ? !proto : proto) fail(`TLS protocol of the socket is ${proto}`)
    })

    // ------------------------------------------------------------ typed results
    await check('typed results, simple protocol', async () => {
      const r = await c.query(TYPED)
      same(r.rows, [TYPED_EXPECT])
    })
    await check('typed results, extended protocol with a $1 parameter', async () => {
      const r = await c.query(`${TYPED}, $1::text AS p`, ['param ✓'])
      same(r.rows, [{ ...TYPED_EXPECT, p: 'param ✓' }])
    })
    await check('typed results, binary: true (decoded by pg binary parsers; raw values equal direct)', async () => {
      const r = await c.query({ text: BINARY, binary: true, queryMode: 'extended' })
      same(r.fields.map((f) => f.format), r.fields.map(() => 'binary'), 'field formats')
      same(r.rows, [BINARY_EXPECT])
      const raw = await c.query({ text: TYPED, binary: true, queryMode: 'extended', types: RAW })
      const want = await ref.query({ text: TYPED, binary: true, queryMode: 'extended', types: RAW })
      same(raw.rows, want.rows, 'raw binary values differ from direct')
    })

    // ------------------------------------------------------------ fan-out
    const equalDirect = async (label, cfg, sort) => {
      await check(label, async () => {
        const got = await fannedOut(viaPgfan, () => c.query(cfg))
        const want = await ref.query(cfg)
        if (want.rows.length === 0) fail('direct query returned no rows')
        const g = sort ? [...got.rows].sort(sort) : got.rows
        const w = sort ? [...want.rows].sort(sort) : want.rows
        assert.equal(g.length, w.length, `row count ${g.length}, direct ${w.length}`)
        same(g, w, 'rows differ from direct')
        same(got.fields.map((f) => [f.name, f.dataTypeID, f.format]), want.fields.map((f) => [f.name, f.dataTypeID, f.format]))
      })
    }
    for (const [label, sql, values, sort] of [
      ['aggregate', AGG_LIT, undefined, null],
      ['aggregate $1', AGG_PARAM, [3], null],
      ['scan', SCAN_LIT, undefined, byId],
      ['scan $1', SCAN_PARAM, [5], byId],
    ]) {
      if (viaPgfan) await check(`EXPLAIN FANOUT ${label} starts with FanOut:`, () => explainFanout(c, sql, values))
      await equalDirect(`fan-out ${label} equals direct${viaPgfan ? ', fanned out' : ''}`, { text: sql, values }, sort)
      // binary ids come back mangled by pg (see BINARY), so compare the scan's rows as a multiset
      const rawSort = sort && ((a, b) => { const [x, y] = [JSON.stringify(norm(a)), JSON.stringify(norm(b))]; return x < y ? -1 : x > y ? 1 : 0 })
      await equalDirect(`fan-out ${label} binary: true, raw values equal direct${viaPgfan ? ', fanned out' : ''}`, { text: sql, values, binary: true, queryMode: 'extended', types: RAW }, rawSort)
    }

    // ------------------------------------------------------------ named prepared statements
    await check(`named prepared statement (fan-out aggregate) run 5 times with different $1${viaPgfan ? ', each fanned out' : ''}`, async () => {
      for (let g = 0; g < 5; g++) {
        const got = await fannedOut(viaPgfan, () => c.query({ name: 'nodepg_agg', text: AGG_PARAM, values: [g * 2] }))
        const want = await ref.query({ text: AGG_PARAM, values: [g * 2] })
        assert.equal(got.rows.length, 10 - g * 2)
        same(got.rows, want.rows, `run ${g + 1}: rows differ from direct`)
      }
      const named = await c.query("SELECT statement FROM pg_prepared_statements WHERE name = 'nodepg_agg'")
      same(named.rows, [{ statement: AGG_PARAM }], 'pg_prepared_statements')
    })
    await check('named prepared statement (point query) run 6 times', async () => {
      for (let i = 0; i < 6; i++) {
        const r = await c.query({ name: 'nodepg_kind', text: 'SELECT id, name, weight, active FROM client_kinds WHERE id = $1', values: [i] })
        same(r.rows, [{ id: i, name: `kind ${i}`, weight: (i * 1.5).toFixed(3), active: i % 2 === 0 }])
      }
    })

    // ------------------------------------------------------------ batches
    // [text, values, expected]: expected is literal rows, {error: SQLSTATE}, or null (ask direct)
    const batch = [
      ['SELECT 1 AS one', undefined, [{ one: 1 }]],
      ['SELECT $1::int * 2 AS x', [21], [{ x: 42 }]],
      ['SELECT name FROM client_kinds WHERE id = $1', [7], [{ name: 'kind 7' }]],
      ["SELECT 'a'::text || $1 AS s", ['b'], [{ s: 'ab' }]],
      [AGG_PARAM, [8], null],
      [SCAN_PARAM, [2], null],
      ['SELECT count(*) FROM client_facts WHERE grp = $1', [4], null],
      ['SELECT generate_series(1, 5) AS g', undefined, [1, 2, 3, 4, 5].map((g) => ({ g }))],
    ]
    const checkBatch = async (client, items) => {
      const wants = await Promise.all(items.map(([text, values, want]) => want ?? ref.query({ text, values }).then((r) => r.rows)))
      const got = await Promise.allSettled(items.map(([text, values]) => client.query({ text, values })))
      got.forEach((g, i) => {
        const what = `query ${i} (${items[i][0]} ${JSON.stringify(items[i][1] ?? [])})`
        if (wants[i].error) {
          if (g.status !== 'rejected') fail(`${what} succeeded, want error ${wants[i].error}`)
          assert.equal(g.reason.code, wants[i].error, `${what}: error code (${g.reason.message})`)
        } else {
          if (g.status === 'rejected') fail(`${what} failed: ${g.reason.code} ${g.reason.message}`)
          const sort = /qty </.test(items[i][0]) ? byId : null
          same(sort ? [...g.value.rows].sort(sort) : g.value.rows, sort ? [...wants[i]].sort(sort) : wants[i], what)
        }
      })
      same((await client.query('SELECT 2 AS two')).rows, [{ two: 2 }], 'client after the batch')
    }
    await check(`batch: ${batch.length} queries issued at once on one client (queued)`, async () => {
      process.noDeprecation = true // pg warns that queued calls are deprecated: queuing is the point here
      await checkBatch(c, batch)
    })
    await check('batch: pipeline: true client, 26 queries in flight with two 1/0 among them', async () => {
      const p = connect(url, { pipeline: true })
      await p.connect()
      try {
        await checkBatch(p, [
          ...batch,
          ['SELECT 1/0', undefined, { error: '22012' }],
          ...batch,
          ['SELECT 10/$1::int AS q', [0], { error: '22012' }],
          ...batch,
        ])
      } finally {
        await p.end()
      }
    })

    // ------------------------------------------------------------ cursor
    const cursorSql = 'SELECT id, amount FROM client_facts WHERE qty < $1'
    await check('pg-cursor read(100) over a fan-out candidate: count and sum equal direct', async () => {
      const want = (await ref.query('SELECT count(*) AS n, sum(amount) AS s FROM client_facts WHERE qty < $1', [40])).rows[0]
      const cur = c.query(new Cursor(cursorSql, [40]))
      let n = 0n
      let cents = 0n
      let reads = 0
      for (;;) {
        const rows = await cur.read(100)
        if (rows.length > 100) fail(`read(100) returned ${rows.length} rows`)
        if (rows.length === 0) break
        reads++
        for (const r of rows) {
          n++
          if (r.amount !== null) cents += BigInt(r.amount.replace('.', ''))
        }
      }
      await cur.close()
      assert.equal(String(n), want.n, 'row count')
      const sign = cents < 0n ? '-' : ''
      const abs = cents < 0n ? -cents : cents
      assert.equal(`${sign}${abs / 100n}.${String(abs % 100n).padStart(2, '0')}`, want.s, 'sum(amount)')
      if (reads < 2) fail(`only ${reads} read(s) for ${n} rows`)
      same((await c.query('SELECT 3 AS three')).rows, [{ three: 3 }], 'client after the cursor')
    })

    // ------------------------------------------------------------ COPY
    await check('COPY FROM STDIN into a temporary table, then read back', async () => {
      await c.query('CREATE TEMP TABLE nodepg_copy (id int, name text, amount numeric(10,2))')
      const lines = ['1\tplain\t1.50\n', '2\ttab\\there\t-2.25\n', '3\tbackslash \\\\ ✓\t\\N\n', '4\t\\N\t0.00\n']
      const more = Array.from({ length: 996 }, (_, i) => `${i + 5}\trow ${i + 5}\t${i + 5}.01\n`)
      await pipeline(Readable.from([...lines, ...more]), c.query(copyFrom('COPY nodepg_copy FROM STDIN')))
      const r = await c.query('SELECT id, name, amount FROM nodepg_copy ORDER BY id')
      assert.equal(r.rows.length, 1000, 'row count')
      same(r.rows.slice(0, 5), [
        { id: 1, name: 'plain', amount: '1.50' },
        { id: 2, name: 'tab\there', amount: '-2.25' },
        { id: 3, name: 'backslash \\ ✓', amount: null },
        { id: 4, name: null, amount: '0.00' },
        { id: 5, name: 'row 5', amount: '5.01' },
      ])
      same(r.rows[999], { id: 1000, name: 'row 1000', amount: '1000.01' })
      const out = await copyOut(c, 'COPY nodepg_copy TO STDOUT')
      assert.equal(out, [...lines, ...more].join(''), 'COPY TO STDOUT of what COPY FROM STDIN wrote')
      await c.query('DROP TABLE nodepg_copy')
    })
    await check('COPY (fan-out candidate) TO STDOUT equals direct', async () => {
      for (const sql of ['COPY (SELECT * FROM client_kinds ORDER BY id) TO STDOUT', 'COPY (SELECT id, amount, created FROM client_facts WHERE qty < 5 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)']) {
        const got = await copyOut(c, sql)
        const want = await copyOut(ref, sql)
        if (want.split('\n').length < 10) fail(`direct ${sql} gave only ${JSON.stringify(want)}`)
        assert.equal(got, want, sql)
      }
    })

    // ------------------------------------------------------------ transaction
    await check('transaction: a row written then rolled back is gone', async () => {
      const id = 1_000_000 + TARGETS.findIndex(([n]) => n === name)
      const countGrp = 'SELECT count(*) AS n FROM client_facts WHERE grp = 3'
      const before = (await ref.query(countGrp)).rows[0].n
      await c.query('BEGIN')
      await c.query("INSERT INTO client_facts VALUES ($1, 3, 1.00, 1, 'rolled back', now())", [id])
      same((await c.query('SELECT label FROM client_facts WHERE id = $1', [id])).rows, [{ label: 'rolled back' }], 'inside the transaction')
      const inside = (await c.query(`${AGG_PARAM}`, [3])).rows.find((r) => r.grp === 3)
      assert.equal(inside.count, String(BigInt(before) + 1n), 'fan-out candidate inside the transaction must see its own insert')
      assert.equal(c.getTransactionStatus(), 'T')
      await c.query('ROLLBACK')
      assert.equal(c.getTransactionStatus(), 'I')
      same((await c.query('SELECT label FROM client_facts WHERE id = $1', [id])).rows, [], 'after rollback')
      same((await ref.query('SELECT label FROM client_facts WHERE id = $1', [id])).rows, [], 'after rollback, direct')
      assert.equal((await c.query(countGrp)).rows[0].n, before, 'count after rollback')
    })

    // ------------------------------------------------------------ errors
    await check('SELECT 1/0 gives 22012 (simple protocol), client usable after', async () => {
      const e = await c.query('SELECT 1/0').then(() => null, (err) => err)
      if (!e) fail('SELECT 1/0 succeeded')
      assert.equal(e.code, '22012', `err.code (message: ${e.message})`)
      same((await c.query('SELECT 1 AS one')).rows, [{ one: 1 }])
    })
    await check('SELECT 1/$1 with 0 gives 22012 (extended protocol), client usable after', async () => {
      const e = await c.query('SELECT 1/$1::int', [0]).then(() => null, (err) => err)
      if (!e) fail('SELECT 1/$1 succeeded')
      assert.equal(e.code, '22012', `err.code (message: ${e.message})`)
      same((await c.query('SELECT $1::int AS one', [1])).rows, [{ one: 1 }])
    })
    await check('error inside a transaction: 22012, then 25P02, ROLLBACK, usable', async () => {
      await c.query('BEGIN')
      const e1 = await c.query('SELECT 1/0').then(() => null, (err) => err)
      assert.equal(e1?.code, '22012')
      const e2 = await c.query('SELECT 1').then(() => null, (err) => err)
      assert.equal(e2?.code, '25P02')
      assert.equal(c.getTransactionStatus(), 'E')
      await c.query('ROLLBACK')
      same((await c.query(AGG_LIT)).rows, (await ref.query(AGG_LIT)).rows, 'fan-out aggregate after the rollback')
    })
  } finally {
    await c.end().catch(() => {})
    await ref.end().catch(() => {})
  }
}

function copyOut(client, sql) {
  return new Promise((resolve, reject) => {
    const chunks = []
    const s = client.query(copyTo(sql))
    s.on('data', (d) => chunks.push(d))
    s.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')))
    s.on('error', reject)
  })
}

const started = Date.now()
try {
  for (const [name, url] of TARGETS) await runTarget(name, url)
} catch (e) {
  console.error(`FAIL ${e.message}`)
  if (/^[0-9A-Z]{5}$/.test(e.code ?? '')) console.error(`     (SQLSTATE ${e.code}${e.detail ? `, detail: ${e.detail}` : ''})`)
  if (process.env.PGFAN_CLIENT_DEBUG) console.error(e.stack)
  process.exit(1)
}
console.log(`node-postgres: ${checks} checks passed on ${TARGETS.length} targets in ${((Date.now() - started) / 1000).toFixed(1)} s (pg ${require('pg/package.json').version})`)
