// postgres.js (`postgres`) through pgfan: the checks of tests/clients/README.md, run against
// PGFAN_CLIENT_TLS_URL (ssl: 'require'), PGFAN_CLIENT_PLAIN_URL and PGFAN_CLIENT_DIRECT_URL
// (ssl: false) in turn, each on a pool of max: 1 (one connection). For each target it checks:
//   - typed results over the common types (simple protocol via sql.unsafe, and the default
//     extended protocol with a named prepared statement and a bound parameter);
//   - a fan-out aggregate and a fan-out scan (literal and ${param} forms) equal to the same
//     query on a direct connection, compared as the exact text the server sent (.raw());
//     through pgfan `EXPLAIN FANOUT` (sql.unsafe, same parameter binding) shows `FanOut:` first
//     and pgfan_queries_total{route="fanout"} rises by one per execution;
//   - prepared statements (prepare: true, the default) run several times, and named on the
//     server (pg_prepared_statements);
//   - pipelining: many queries fired at once on the one connection (several Syncs in
//     flight), fan-out candidates and a failing 1/0 among them; every result checked;
//   - .cursor(100) (Execute with max_rows): the count and sum of all rows;
//   - COPY FROM STDIN with .writable() into a temporary table, COPY TO STDOUT with .readable();
//   - sql.begin with rollback, a savepoint rolled back inside it, a fan-out candidate inside
//     the transaction that must see the uncommitted row;
//   - SELECT 1/0 gives error.code 22012 (simple and extended, and inside a transaction) and
//     the connection stays usable.
// Numbers are compared as the strings postgres.js returns (int8 and numeric), never as floats.
// Exits non-zero on the first failed check.
import { createRequire } from 'node:module'
import { pipeline } from 'node:stream/promises'
import { Readable } from 'node:stream'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'

const require = createRequire(process.env.PGFAN_NODE_MODULES + '/')
const postgres = require('postgres')

const env = (k) => process.env[k] ?? fail(`${k} is not set (run through tests/clients/run)`)
const TARGETS = [
  ['tls', env('PGFAN_CLIENT_TLS_URL'), 'require'],
  ['plain', env('PGFAN_CLIENT_PLAIN_URL'), false],
  ['direct', env('PGFAN_CLIENT_DIRECT_URL'), false],
]

const AGG = 'SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts'
const SCAN = 'SELECT id, amount, label FROM client_facts'

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
// .raw() rows: arrays of Buffers holding the text the server sent; sorted as whole rows
const rawText = (rows) => rows.map((r) => r.map((v) => (v === null ? null : v.toString('utf8'))))
const byFirstInt = (a, b) => (BigInt(a[0]) < BigInt(b[0]) ? -1 : BigInt(a[0]) > BigInt(b[0]) ? 1 : 0)

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

const TYPED = `SELECT true AS b, 32767::int2 AS i2, (-2147483648)::int4 AS i4, 9007199254740993::int8 AS i8,
  12345.6789::numeric AS num, 1.50::numeric(12,2) AS num2, 1.5::float4 AS f4, 0.1::float8 AS f8,
  'héllo ✓'::text AS t, 'abc'::varchar(10) AS vc, '\\xdeadbeef00'::bytea AS ba,
  date '2024-02-29' AS d, time '13:45:56.789' AS tm, timestamp '2024-02-29 13:45:56.789' AS ts,
  timestamptz '2024-02-29 13:45:56.789+02' AS tstz, interval '1 day 02:03:04.5' AS iv,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '{"a": [1, "x"]}'::json AS j,
  '{"c": true, "b": null}'::jsonb AS jb, ARRAY[1, 2, 3]::int[] AS ia,
  ARRAY['x', 'y z', '"q"']::text[] AS ta, NULL::int AS n`
// postgres.js: int8 and numeric as strings, interval and time as text, timestamp parsed as
// local time (TZ=UTC is set by ./run). (It decodes a NULL inside an int[] as NaN and inside
// a text[] as 'NULL', so the arrays here hold no NULL.)
const TYPED_EXPECT = {
  b: true, i2: 32767, i4: -2147483648, i8: '9007199254740993', num: '12345.6789', num2: '1.50',
  f4: 1.5, f8: 0.1, t: 'héllo ✓', vc: 'abc', ba: Buffer.from('deadbeef00', 'hex'),
  d: new Date('2024-02-29T00:00:00Z'), tm: '13:45:56.789', ts: new Date('2024-02-29T13:45:56.789Z'),
  tstz: new Date('2024-02-29T11:45:56.789Z'), iv: '1 day 02:03:04.5',
  u: 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', j: { a: [1, 'x'] }, jb: { b: null, c: true },
  ia: [1, 2, 3], ta: ['x', 'y z', '"q"'], n: null,
}

async function runTarget(name, url, ssl) {
  target = name
  const viaPgfan = name !== 'direct'
  const opts = { max: 1, onnotice: () => {} }
  const ref = postgres(env('PGFAN_CLIENT_DIRECT_URL'), { ...opts, ssl: false })
  const sql = postgres(url, { ...opts, ssl })
  try {
    await check(`connect (ssl: ${ssl})`, async () => {
      same(await sql`SELECT 1 AS one`, [{ one: 1 }])
    })

    // ------------------------------------------------------------ typed results
    await check('typed results, simple protocol (sql.unsafe)', async () => {
      same(await sql.unsafe(TYPED), [TYPED_EXPECT])
    })
    await check('typed results, extended protocol (prepared, bound parameter) x3', async () => {
      for (let i = 0; i < 3; i++) {
        const p = `param ✓ ${i}`
        same(await sql.unsafe(`${TYPED}, $1::text AS p`, [p], { prepare: true }), [{ ...TYPED_EXPECT, p }])
      }
    })

    // ------------------------------------------------------------ fan-out
    const fanout = async (label, text, params, sort) => {
      if (viaPgfan) {
        await check(`EXPLAIN FANOUT ${label} starts with FanOut:`, async () => {
          const rows = await sql.unsafe(`EXPLAIN FANOUT ${text}`, params).values()
          const first = rows[0]?.[0]
          if (typeof first !== 'string' || !first.startsWith('FanOut:'))
            fail(`first row is ${JSON.stringify(first)}, want "FanOut: ..." (all rows: ${JSON.stringify(rows)})`)
        })
      }
      await check(`fan-out ${label} equals direct (exact text)${viaPgfan ? ', fanned out' : ''}`, async () => {
        const got = await fannedOut(viaPgfan, () => sql.unsafe(text, params, { prepare: true, simple: false }).raw())
        const want = await ref.unsafe(text, params, { prepare: true, simple: false }).raw()
        if (want.length === 0) fail('direct query returned no rows')
        assert.equal(got.length, want.length, `row count ${got.length}, direct ${want.length}`)
        same(got.columns.map((c) => [c.name, c.type]), want.columns.map((c) => [c.name, c.type]), 'columns')
        const [g, w] = [rawText(got), rawText(want)]
        if (sort) g.sort(sort), w.sort(sort)
        same(g, w, 'rows differ from direct')
      })
    }
    await fanout('aggregate', `${AGG} GROUP BY grp ORDER BY grp`, [])
    await fanout('aggregate ${param}', `${AGG} WHERE grp >= $1 GROUP BY grp ORDER BY grp`, [3])
    await fanout('scan', `${SCAN} WHERE qty < 5`, [], byFirstInt)
    await fanout('scan ${param}', `${SCAN} WHERE qty < $1`, [5], byFirstInt)

    // ------------------------------------------------------------ prepared statements
    await check(`prepared statement (tagged template, fan-out aggregate) run 5 times${viaPgfan ? ', each fanned out' : ''}`, async () => {
      for (let g = 0; g < 5; g++) {
        const got = await fannedOut(viaPgfan, () => sql`SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts WHERE grp >= ${g * 2} GROUP BY grp ORDER BY grp`)
        const want = await ref.unsafe(`${AGG} WHERE grp >= $1 GROUP BY grp ORDER BY grp`, [g * 2])
        assert.equal(got.length, 10 - g * 2)
        same(got, want, `run ${g + 1}: rows differ from direct`)
      }
      const named = await sql`SELECT name FROM pg_prepared_statements WHERE statement LIKE ${'%FROM client_facts WHERE grp >= $1 GROUP BY grp ORDER BY grp'}`
      if (named.length < 1) fail(`pg_prepared_statements has ${JSON.stringify(named)}, want the driver's one named statement`)
    })
    await check('prepared statement (point query) run 6 times', async () => {
      for (let i = 0; i < 6; i++) {
        same(await sql`SELECT id, name, weight, active FROM client_kinds WHERE id = ${i}`, [
          { id: i, name: `kind ${i}`, weight: (i * 1.5).toFixed(3), active: i % 2 === 0 },
        ])
      }
    })

    // ------------------------------------------------------------ pipelining
    await check('pipelining: 3 x 10 queries in flight on one connection, two 1/0 among them', async () => {
      // [query, expected]: expected is literal rows, {error: SQLSTATE} or a direct query
      const round = (i) => [
        [sql`SELECT ${i}::int * 2 AS x`, [{ x: i * 2 }]],
        [sql`SELECT name FROM client_kinds WHERE id = ${i % 10}`, [{ name: `kind ${i % 10}` }]],
        [sql`SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts WHERE grp >= ${i} GROUP BY grp ORDER BY grp`,
          ref.unsafe(`${AGG} WHERE grp >= $1 GROUP BY grp ORDER BY grp`, [i])],
        [sql`SELECT id, amount, label FROM client_facts WHERE qty < ${i + 1} ORDER BY id`, ref.unsafe(`${SCAN} WHERE qty < $1 ORDER BY id`, [i + 1])],
        [sql`SELECT count(*) AS n FROM client_facts WHERE grp = ${i}`, ref.unsafe('SELECT count(*) AS n FROM client_facts WHERE grp = $1', [i])],
        [sql.unsafe(`SELECT ${i} AS lit`), [{ lit: i }]],
        [sql`SELECT generate_series(1, ${i + 2}) AS g`, Array.from({ length: i + 2 }, (_, k) => ({ g: k + 1 }))],
        [sql`SELECT ${'text ' + i} || ${'✓'} AS s`, [{ s: `text ${i}✓` }]],
        [sql`SELECT ${String(i)}::numeric / 4 AS q`, ref.unsafe('SELECT $1::numeric / 4 AS q', [String(i)])],
        [sql`SELECT now() = now() AS t`, [{ t: true }]],
      ]
      const items = [...round(1), [sql`SELECT 1/0`, { error: '22012' }], ...round(2), [sql`SELECT 1/${0}::int`, { error: '22012' }], ...round(3)]
      // all of them were fired before any await: postgres.js writes them back to back
      const got = await Promise.allSettled(items.map(([q]) => q))
      for (let i = 0; i < items.length; i++) {
        const want = await items[i][1]
        const what = `query ${i}`
        if (want.error) {
          if (got[i].status !== 'rejected') fail(`${what} succeeded, want error ${want.error}`)
          assert.equal(got[i].reason.code, want.error, `${what}: error code (${got[i].reason.message})`)
        } else {
          if (got[i].status === 'rejected') fail(`${what} failed: ${got[i].reason.code} ${got[i].reason.message}`)
          same([...got[i].value], [...want], what)
        }
      }
      same(await sql`SELECT 2 AS two`, [{ two: 2 }], 'connection after the pipeline')
    })

    // ------------------------------------------------------------ cursor
    await check('.cursor(100) over a fan-out candidate: count and sum equal direct', async () => {
      const [want] = await ref`SELECT count(*) AS n, sum(amount) AS s FROM client_facts WHERE qty < ${40}`
      let n = 0n
      let cents = 0n
      let reads = 0
      for await (const rows of sql`SELECT id, amount FROM client_facts WHERE qty < ${40}`.cursor(100)) {
        if (rows.length > 100) fail(`a read of 100 returned ${rows.length} rows`)
        reads++
        for (const r of rows) {
          n++
          if (r.amount !== null) cents += BigInt(r.amount.replace('.', ''))
        }
      }
      assert.equal(String(n), want.n, 'row count')
      const abs = cents < 0n ? -cents : cents
      assert.equal(`${cents < 0n ? '-' : ''}${abs / 100n}.${String(abs % 100n).padStart(2, '0')}`, want.s, 'sum(amount)')
      if (reads < 2) fail(`only ${reads} read(s) for ${n} rows`)
      same(await sql`SELECT 3 AS three`, [{ three: 3 }], 'connection after the cursor')
    })

    // ------------------------------------------------------------ COPY
    // Every COPY TO output here stays under 16 KB, the highWaterMark of postgres.js's
    // .readable(): above it postgres.js 3.4.9 can leave the socket paused when CopyData and
    // CopyDone arrive in one chunk, and the next query hangs, directly against PostgreSQL too
    // (porsager/postgres issue #499, pull request #1016).
    await check('COPY FROM STDIN (.writable()) into a temporary table, read back, COPY TO STDOUT', async () => {
      await sql`CREATE TEMP TABLE pgjs_copy (id int, name text, amount numeric(10,2))`
      const lines = ['1\tplain\t1.50\n', '2\ttab\\there\t-2.25\n', '3\tbackslash \\\\ ✓\t\\N\n', '4\t\\N\t0.00\n']
      const more = Array.from({ length: 496 }, (_, i) => `${i + 5}\trow ${i + 5}\t${i + 5}.01\n`)
      await pipeline(Readable.from([...lines, ...more]), await sql`COPY pgjs_copy FROM STDIN`.writable())
      const rows = await sql`SELECT id, name, amount FROM pgjs_copy ORDER BY id`
      assert.equal(rows.length, 500, 'row count')
      same(rows.slice(0, 5), [
        { id: 1, name: 'plain', amount: '1.50' },
        { id: 2, name: 'tab\there', amount: '-2.25' },
        { id: 3, name: 'backslash \\ ✓', amount: null },
        { id: 4, name: null, amount: '0.00' },
        { id: 5, name: 'row 5', amount: '5.01' },
      ])
      same(rows[499], { id: 500, name: 'row 500', amount: '500.01' })
      assert.equal(await copyOut(sql, 'COPY pgjs_copy TO STDOUT'), [...lines, ...more].join(''), 'COPY TO STDOUT of what COPY FROM STDIN wrote')
      await sql`DROP TABLE pgjs_copy`
    })
    await check('COPY (fan-out candidate) TO STDOUT (.readable()) equals direct', async () => {
      for (const q of ['COPY (SELECT * FROM client_kinds ORDER BY id) TO STDOUT', 'COPY (SELECT id, amount, created FROM client_facts WHERE qty < 1 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)']) {
        const want = await copyOut(ref, q)
        if (want.split('\n').length < 10) fail(`direct ${q} gave only ${JSON.stringify(want)}`)
        assert.equal(await copyOut(sql, q), want, q)
      }
    })

    // ------------------------------------------------------------ transaction
    await check('sql.begin: savepoint rolled back, fan-out candidate sees own insert, rollback', async () => {
      const id = 2_000_000 + TARGETS.findIndex(([n]) => n === name) * 10
      const countGrp = 'SELECT count(*) AS n FROM client_facts WHERE grp = 3'
      const [{ n: before }] = await ref.unsafe(countGrp)
      class Rollback extends Error {}
      const e = await sql
        .begin(async (tx) => {
          await tx`INSERT INTO client_facts VALUES (${id}, 3, 1.00, 1, 'rolled back', now())`
          await tx
            .savepoint(async (sp) => {
              await sp`INSERT INTO client_facts VALUES (${id + 1}, 3, 1.00, 1, 'savepoint', now())`
              throw new Rollback()
            })
            .catch((err) => { if (!(err instanceof Rollback)) throw err })
          same(await tx`SELECT label FROM client_facts WHERE id >= ${id} AND id < ${id + 10}`, [{ label: 'rolled back' }], 'inside the transaction')
          const inside = (await tx`SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts WHERE grp >= ${3} GROUP BY grp ORDER BY grp`).find((r) => r.grp === 3)
          assert.equal(inside.count, String(BigInt(before) + 1n), 'fan-out candidate inside the transaction must see its own insert (and not the savepoint one)')
          throw new Rollback()
        })
        .then(() => null, (err) => err)
      if (!(e instanceof Rollback)) throw e ?? new Error('sql.begin did not reject')
      same(await sql`SELECT label FROM client_facts WHERE id >= ${id} AND id < ${id + 10}`, [], 'after rollback')
      same(await ref`SELECT label FROM client_facts WHERE id >= ${id} AND id < ${id + 10}`, [], 'after rollback, direct')
      same(await sql.unsafe(countGrp), [{ n: before }], 'count after rollback')
    })

    // ------------------------------------------------------------ errors
    await check('SELECT 1/0 gives 22012 (simple and extended), connection usable after', async () => {
      for (const q of [() => sql.unsafe('SELECT 1/0'), () => sql`SELECT 1/${0}::int`]) {
        const e = await q().then(() => null, (err) => err)
        if (!e) fail('division by zero succeeded')
        assert.equal(e.code, '22012', `error.code (message: ${e.message})`)
        same(await sql`SELECT ${1}::int AS one`, [{ one: 1 }])
      }
    })
    await check('error inside sql.begin: 22012 rejects begin, connection usable after', async () => {
      const e = await sql.begin(async (tx) => {
        await tx`SELECT 1/0`
      }).then(() => null, (err) => err)
      assert.equal(e?.code, '22012', `error.code (${e?.message})`)
      same(await sql.unsafe(`${AGG} GROUP BY grp ORDER BY grp`), await ref.unsafe(`${AGG} GROUP BY grp ORDER BY grp`), 'fan-out aggregate after the rollback')
    })
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {})
    await ref.end({ timeout: 5 }).catch(() => {})
  }
}

async function copyOut(s, q) {
  const chunks = []
  for await (const chunk of await s.unsafe(q).readable()) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

const started = Date.now()
try {
  for (const [name, url, ssl] of TARGETS) await runTarget(name, url, ssl)
} catch (e) {
  console.error(`FAIL ${e.message}`)
  if (/^[0-9A-Z]{5}$/.test(e.code ?? '')) console.error(`     (SQLSTATE ${e.code}${e.detail ? `, detail: ${e.detail}` : ''})`)
  if (process.env.PGFAN_CLIENT_DEBUG) console.error(e.stack)
  process.exit(1)
}
console.log(`postgres.js: ${checks} checks passed on ${TARGETS.length} targets in ${((Date.now() - started) / 1000).toFixed(1)} s (postgres ${JSON.parse(readFileSync(`${process.env.PGFAN_NODE_MODULES}/postgres/package.json`)).version})`)
