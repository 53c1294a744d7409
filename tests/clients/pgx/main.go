// pgx v4 (Debian golang-github-jackc-pgx-v4-dev) through pgfan; see tests/clients/README.md.
// Built by ./run in GOPATH mode against /usr/share/gocode.
//
// For each target (pgfan with SCRAM over TLS, pgfan with SCRAM without TLS, the primary
// directly) it checks, against a second connection straight to the primary where data is
// compared:
//   - typed results over the common types, binary (pgx's default for known types) and text
//     (QueryResultFormats), and bound parameters of those types read back unchanged;
//   - a fan-out aggregate and a fan-out scan, with literals and with a $1 parameter, equal to
//     the direct answer: the same field descriptions, the same raw value bytes and the same
//     decoded values. Through pgfan the route is asserted with EXPLAIN FANOUT (simple
//     protocol here; pgx's own extended protocol as the last check) and with
//     pgfan_queries_total{route="fanout"} rising by one per execution. The parameterised ones run 7 times from the statement cache;
//   - the statement cache: the same parameterised query 10 times is one named lrupsc_*
//     statement in pg_prepared_statements; statement_cache_mode=describe leaves none;
//   - pgx.Batch with inserts, a count, a fan-out aggregate and a lookup in one round trip,
//     and a batch with 1/0 in the middle that leaves nothing behind;
//   - a cursor read in pieces: DECLARE CURSOR + FETCH 1000 in a transaction (pgx has no
//     max_rows API), and Execute with max_rows 1000 / PortalSuspended through pgconn's own
//     message layer (pgproto3 messages over PgConn.SendBytes/ReceiveMessage);
//   - CopyFrom (binary COPY) and pgconn.CopyFrom (text), pgconn.CopyTo in text, csv and
//     binary (the latter two equal to direct);
//   - a transaction with rollback; fan-out candidates inside a transaction, before and after
//     it wrote a row the answer must include; and in one pgx.Batch after BEGIN + SET
//     TRANSACTION SNAPSHOT, where it must answer from the imported snapshot after another
//     session deleted rows and the replicas replayed that;
//   - SELECT 1/0 -> *pgconn.PgError with Code 22012 (plain, bound parameter, in a
//     transaction where the next statement gets 25P02); the connection stays usable.
//
// Prints each check and exits 1 at the first failure, saying what differed.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	neturl "net/url"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgconn/stmtcache"
	"github.com/jackc/pgproto3/v2"
	"github.com/jackc/pgtype"
	"github.com/jackc/pgx/v4"
)

var (
	ctx    = context.Background()
	target string
)

type failure struct{ msg string }

func fail(format string, args ...interface{}) { panic(failure{fmt.Sprintf(format, args...)}) }

func step(format string, args ...interface{}) {
	fmt.Printf("[%s] %s\n", target, fmt.Sprintf(format, args...))
}

func show(v interface{}) string {
	s := fmt.Sprintf("%#v", v)
	if b, ok := v.([]byte); ok {
		s = fmt.Sprintf("%q", b)
	}
	if len(s) > 600 {
		s = s[:600] + fmt.Sprintf("... (%d chars)", len(s))
	}
	return s
}

func eq(got, want interface{}, what string) {
	if !reflect.DeepEqual(got, want) {
		fail("%s\n    got:  %s\n    want: %s", what, show(got), show(want))
	}
}

func must(err error, what string) {
	if err != nil {
		fail("%s: %v", what, err)
	}
}

func connect(url string) *pgx.Conn {
	c, err := pgx.Connect(ctx, url)
	must(err, "connect "+strings.SplitN(url, "@", 2)[len(strings.SplitN(url, "@", 2))-1])
	return c
}

// withParam adds key=value to a postgres:// URL.
func withParam(url, kv string) string {
	if strings.Contains(url, "?") {
		return url + "&" + kv
	}
	return url + "?" + kv
}

// result is a query's answer as exactly as pgx sees it.
type result struct {
	fields  []string   // name, type OID, format
	raw     [][]string // raw wire bytes of each value (nil shown as <NULL>)
	decoded [][]string // pgx's decoded values
}

func query(c *pgx.Conn, sql string, args ...interface{}) result {
	rows, err := c.Query(ctx, sql, args...)
	must(err, sql)
	return collect(rows, sql)
}

func collect(rows pgx.Rows, sql string) result {
	defer rows.Close()
	var r result
	for _, f := range rows.FieldDescriptions() {
		r.fields = append(r.fields, fmt.Sprintf("%s oid=%d format=%d", f.Name, f.DataTypeOID, f.Format))
	}
	for rows.Next() {
		var raw, dec []string
		for _, v := range rows.RawValues() {
			if v == nil {
				raw = append(raw, "<NULL>")
			} else {
				raw = append(raw, string(v))
			}
		}
		vals, err := rows.Values()
		must(err, "values of "+sql)
		for _, v := range vals {
			dec = append(dec, decodedString(v))
		}
		r.raw = append(r.raw, raw)
		r.decoded = append(r.decoded, dec)
	}
	must(rows.Err(), sql)
	return r
}

func decodedString(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "<NULL>"
	case pgtype.Numeric:
		return numericString(x)
	case time.Time:
		return x.UTC().Format(time.RFC3339Nano)
	}
	return fmt.Sprintf("%v", v)
}

// numericString writes a pgtype.Numeric as a plain decimal (Int x 10^Exp, scale kept).
func numericString(n pgtype.Numeric) string {
	if n.Status != pgtype.Present {
		return "<NULL>"
	}
	if n.NaN {
		return "NaN"
	}
	s := new(big.Int).Abs(n.Int).String()
	if n.Exp >= 0 {
		s += strings.Repeat("0", int(n.Exp))
	} else {
		scale := int(-n.Exp)
		if len(s) <= scale {
			s = strings.Repeat("0", scale-len(s)+1) + s
		}
		s = s[:len(s)-scale] + "." + s[len(s)-scale:]
	}
	if n.Int.Sign() < 0 {
		s = "-" + s
	}
	return s
}

func rat(s string) *big.Rat {
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		fail("not a number: %q", s)
	}
	return r
}

func one(c *pgx.Conn, sql string, args ...interface{}) string {
	r := query(c, sql, args...)
	if len(r.decoded) != 1 || len(r.decoded[0]) != 1 {
		fail("one value from %s: got %v", sql, r.decoded)
	}
	return r.decoded[0][0]
}

func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return fmt.Sprintf("no *pgconn.PgError (%v)", err)
}

func expectCode(err error, code, what string) {
	if err == nil {
		fail("%s: no error, want SQLSTATE %s", what, code)
	}
	eq(pgCode(err), code, what+": *pgconn.PgError Code ("+err.Error()+")")
}

func fanoutCount() int64 {
	resp, err := http.Get(os.Getenv("PGFAN_CLIENT_METRICS_URL"))
	must(err, "metrics")
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, `pgfan_queries_total{route="fanout"}`) {
			f, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
			must(err, line)
			return int64(f)
		}
	}
	return 0
}

// ------------------------------------------------------------------ checks

const typesSQL = `SELECT true AS bool, 32767::int2 AS i2, '-2147483648'::int4 AS i4,
 9223372036854775807::int8 AS i8, 12345.678901234567890::numeric AS num,
 -0.000123::numeric(10,6) AS num_small, 1.5::float4 AS f4, -2.25::float8 AS f8,
 'text ü €'::text AS txt, 'vc'::varchar(10) AS vc, '\xdeadbeef00'::bytea AS bin,
 '2024-02-29'::date AS d, '13:45:56.123456'::time AS t,
 '2024-02-29 13:45:56.123456'::timestamp AS ts,
 '2024-02-29 13:45:56.123456+02'::timestamptz AS tstz,
 '1 year 2 mons 3 days 04:05:06.5'::interval AS iv,
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,
 '{"a": [1, 2]}'::json AS js, '{"b": {"c": null}}'::jsonb AS jsb,
 ARRAY[1, 2, NULL, 4]::int[] AS ia, ARRAY['x', 'y z', NULL]::text[] AS ta, NULL::int AS nul`

func typed(c *pgx.Conn, mode string, opts ...interface{}) {
	step("typed results, %s", mode)
	var (
		b        bool
		i2       int16
		i4       int32
		i8       int64
		num, nsm pgtype.Numeric
		f4       float32
		f8       float64
		txt, vc  string
		bin      []byte
		d, ts    time.Time
		tm       pgtype.Time
		tstz     time.Time
		iv       pgtype.Interval
		id       pgtype.UUID
		js, jsb  string
		ia       pgtype.Int4Array
		ta       pgtype.TextArray
		nul      *int32
	)
	rows, err := c.Query(ctx, typesSQL, opts...)
	must(err, "typed query")
	wantFormat := int16(pgx.BinaryFormatCode)
	if len(opts) > 0 {
		wantFormat = pgx.TextFormatCode
	}
	eq(rows.FieldDescriptions()[3].Format, wantFormat, "result format of the int8 column ("+mode+")")
	if !rows.Next() {
		fail("typed results: no row (%v)", rows.Err())
	}
	must(rows.Scan(&b, &i2, &i4, &i8, &num, &nsm, &f4, &f8, &txt, &vc, &bin, &d, &tm, &ts, &tstz, &iv, &id,
		&js, &jsb, &ia, &ta, &nul), "typed scan")
	if rows.Next() {
		fail("typed results: more than one row")
	}
	rows.Close()
	must(rows.Err(), "typed query")
	eq(b, true, "bool")
	eq(i2, int16(32767), "int2")
	eq(i4, int32(-2147483648), "int4")
	eq(i8, int64(9223372036854775807), "int8")
	eq(numericString(num), "12345.678901234567890", "numeric")
	eq(numericString(nsm), "-0.000123", "numeric(10,6)")
	eq(f4, float32(1.5), "float4")
	eq(f8, -2.25, "float8")
	eq(txt, "text ü €", "text")
	eq(vc, "vc", "varchar")
	eq(bin, []byte{0xde, 0xad, 0xbe, 0xef, 0}, "bytea")
	eq(d.Format("2006-01-02"), "2024-02-29", "date")
	eq(tm, pgtype.Time{Microseconds: (13*3600+45*60+56)*1000000 + 123456, Status: pgtype.Present}, "time")
	eq(ts.Format("2006-01-02 15:04:05.999999"), "2024-02-29 13:45:56.123456", "timestamp")
	if want := time.Date(2024, 2, 29, 11, 45, 56, 123456000, time.UTC); !tstz.Equal(want) {
		fail("timestamptz\n    got:  %v\n    want: %v", tstz, want)
	}
	eq(iv, pgtype.Interval{Months: 14, Days: 3, Microseconds: (4*3600+5*60+6)*1000000 + 500000, Status: pgtype.Present}, "interval")
	eq(fmt.Sprintf("%x", id.Bytes), "a0eebc999c0b4ef8bb6d6bb9bd380a11", "uuid")
	eq(js, `{"a": [1, 2]}`, "json")
	eq(jsb, `{"b": {"c": null}}`, "jsonb")
	var ints []string
	for _, e := range ia.Elements {
		if e.Status == pgtype.Present {
			ints = append(ints, strconv.Itoa(int(e.Int)))
		} else {
			ints = append(ints, "NULL")
		}
	}
	eq(ints, []string{"1", "2", "NULL", "4"}, "int[]")
	var texts []string
	for _, e := range ta.Elements {
		if e.Status == pgtype.Present {
			texts = append(texts, e.String)
		} else {
			texts = append(texts, "NULL")
		}
	}
	eq(texts, []string{"x", "y z", "NULL"}, "text[]")
	eq(nul, (*int32)(nil), "NULL::int")

	// bound parameters of the common types come back unchanged
	at := time.Date(2001, 2, 3, 4, 5, 6, 789012000, time.UTC)
	var (
		pi8   int64
		pnum  pgtype.Numeric
		ptxt  string
		pbin  []byte
		pdate time.Time
		pts   time.Time
		puuid pgtype.UUID
		pf8   float64
		pb    bool
	)
	numIn := pgtype.Numeric{}
	must(numIn.Set("-98765.4321000"), "numeric Set")
	uuidIn := [16]byte{0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3, 0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00}
	must(c.QueryRow(ctx, "SELECT $1::int8, $2::numeric, $3::text, $4::bytea, $5::date, $6::timestamptz, $7::uuid, $8::float8, $9::bool",
		append(opts, int64(-42), &numIn, `it's "quoted"`, []byte{0, 1, 255}, time.Date(1999, 12, 31, 0, 0, 0, 0, time.UTC), at, uuidIn, 0.1, false)...).
		Scan(&pi8, &pnum, &ptxt, &pbin, &pdate, &pts, &puuid, &pf8, &pb), "bound parameters")
	eq(pi8, int64(-42), "bound int8")
	eq(rat(numericString(pnum)).Cmp(rat("-98765.4321")), 0, "bound numeric value "+numericString(pnum))
	eq(ptxt, `it's "quoted"`, "bound text")
	eq(pbin, []byte{0, 1, 255}, "bound bytea")
	eq(pdate.Format("2006-01-02"), "1999-12-31", "bound date")
	if !pts.Equal(at) {
		fail("bound timestamptz: got %v want %v", pts, at)
	}
	eq(puuid.Bytes, uuidIn, "bound uuid")
	eq(pf8, 0.1, "bound float8")
	eq(pb, false, "bound bool")
}

const (
	aggSQL  = "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts"
	scanSQL = "SELECT id, amount, label FROM client_facts"
)

func sortByID(r *result) {
	idx := make([]int, len(r.raw))
	for i := range idx {
		idx[i] = i
	}
	id := func(i int) int64 {
		v, err := strconv.ParseInt(r.decoded[i][0], 10, 64)
		must(err, "id")
		return v
	}
	sort.Slice(idx, func(a, b int) bool { return id(idx[a]) < id(idx[b]) })
	raw, dec := make([][]string, len(idx)), make([][]string, len(idx))
	for i, j := range idx {
		raw[i], dec[i] = r.raw[j], r.decoded[j]
	}
	r.raw, r.decoded = raw, dec
}

func sameRows(got, want [][]string, what string) {
	if reflect.DeepEqual(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && reflect.DeepEqual(got[i], want[i]) {
		i++
	}
	var g, w interface{} = "none", "none"
	if i < len(got) {
		g = got[i]
	}
	if i < len(want) {
		w = want[i]
	}
	fail("%s: rows differ from direct (%d vs %d rows), first difference at row %d\n    got:  %q\n    want: %q",
		what, len(got), len(want), i, g, w)
}

func fanout(c, direct *pgx.Conn, viaPgfan bool, name, sql string, sortID bool, runs int, args ...interface{}) {
	step("%s: %s  args %v  x%d", name, sql, args, runs)
	if viaPgfan {
		explainFanout(c, true, name, sql, args...)
	}
	want := query(direct, sql, args...)
	if len(want.raw) == 0 {
		fail("%s: the direct answer has no rows", name)
	}
	if sortID {
		sortByID(&want)
	}
	for run := 1; run <= runs; run++ {
		var before int64
		if viaPgfan {
			before = fanoutCount()
		}
		got := query(c, sql, args...)
		if viaPgfan {
			eq(fanoutCount()-before, int64(1), fmt.Sprintf(`%s run %d: pgfan_queries_total{route="fanout"} increase`, name, run))
		}
		if sortID {
			sortByID(&got)
		}
		what := fmt.Sprintf("%s run %d", name, run)
		eq(got.fields, want.fields, what+": field descriptions")
		sameRows(got.raw, want.raw, what+": raw values")
		sameRows(got.decoded, want.decoded, what+": decoded values")
	}
}

// explainFanout: EXPLAIN FANOUT sql answers a first row starting with "FanOut:", in the simple
// protocol (pgx inlines the arguments) or pgx's default extended protocol.
func explainFanout(c *pgx.Conn, simple bool, name, sql string, args ...interface{}) {
	how := "extended protocol"
	if simple {
		how = "simple protocol"
	}
	plan := query(c, "EXPLAIN FANOUT "+sql, append([]interface{}{pgx.QuerySimpleProtocol(simple)}, args...)...)
	if len(plan.decoded) == 0 || !strings.HasPrefix(plan.decoded[0][0], "FanOut:") {
		fail("%s: EXPLAIN FANOUT (%s) first row\n    got:  %v\n    want: FanOut: ...", name, how, plan.decoded)
	}
}

func statementCache(c, direct *pgx.Conn, url string) {
	sql := "SELECT name, weight, active FROM client_kinds WHERE id = $1"
	named := "SELECT name FROM pg_prepared_statements WHERE statement = $1"
	step("statement cache (prepare mode): %s x10", sql)
	cache := c.StatementCache()
	eq(cache.Mode(), stmtcache.ModePrepare, "statement cache mode")
	cached := cache.Len()
	for i := 0; i < 10; i++ {
		got, want := query(c, sql, i), query(direct, sql, i)
		sameRows(got.raw, want.raw, fmt.Sprintf("client_kinds id %d", i))
	}
	eq(cache.Len(), cached+1, "statement cache entries after 10 runs of one new query")
	names := query(c, named, sql).decoded
	if len(names) != 1 || !strings.HasPrefix(names[0][0], "lrupsc_") {
		fail("pg_prepared_statements for %q\n    got:  %v\n    want: one lrupsc_* statement", sql, names)
	}
	sd, err := cache.Get(ctx, sql)
	must(err, "statement cache Get")
	eq(sd.Name, names[0][0], "the cached statement is the one in pg_prepared_statements")
	step("named statement %s in pg_prepared_statements", names[0][0])

	step("statement_cache_mode=describe: no named statement")
	d := connect(withParam(url, "statement_cache_mode=describe"))
	defer d.Close(ctx)
	for i := 0; i < 10; i++ {
		sameRows(query(d, sql, i).raw, query(direct, sql, i).raw, fmt.Sprintf("describe mode: client_kinds id %d", i))
	}
	eq(query(d, named, sql).decoded, [][]string(nil), "pg_prepared_statements in describe mode")
}

func batches(c, direct *pgx.Conn) {
	step("pgx.Batch: 20 inserts, a count, a fan-out aggregate, a lookup; a failing batch")
	_, err := c.Exec(ctx, "CREATE TEMP TABLE batch_t (id int PRIMARY KEY, v text)")
	must(err, "create batch_t")
	agg := aggSQL + " WHERE grp >= $1 GROUP BY grp ORDER BY grp"
	b := &pgx.Batch{}
	for i := 1; i <= 20; i++ {
		b.Queue("INSERT INTO batch_t VALUES ($1, $2)", i, fmt.Sprintf("v%d", i))
	}
	b.Queue("SELECT count(*), sum(id) FROM batch_t")
	b.Queue(agg, 3)
	b.Queue("SELECT name FROM client_kinds WHERE id = $1", 4)
	br := c.SendBatch(ctx, b)
	for i := 1; i <= 20; i++ {
		tag, err := br.Exec()
		must(err, fmt.Sprintf("batch insert %d", i))
		eq(tag.String(), "INSERT 0 1", "batch insert tag")
	}
	var n, sum int64
	must(br.QueryRow().Scan(&n, &sum), "batch count")
	eq([]int64{n, sum}, []int64{20, 210}, "batch: count(*), sum(id) after the inserts in the same batch")
	rows, err := br.Query()
	must(err, "batch aggregate")
	var got [][]string
	for rows.Next() {
		var row []string
		for _, v := range rows.RawValues() {
			row = append(row, string(v))
		}
		got = append(got, row)
	}
	must(rows.Err(), "batch aggregate rows")
	sameRows(got, query(direct, agg, 3).raw, "batch: fan-out aggregate")
	var name string
	must(br.QueryRow().Scan(&name), "batch lookup")
	eq(name, one(direct, "SELECT name FROM client_kinds WHERE id = 4"), "batch: lookup")
	must(br.Close(), "batch close")

	// one implicit transaction up to the Sync: the error undoes the whole batch
	b = &pgx.Batch{}
	b.Queue("INSERT INTO batch_t VALUES ($1, $2)", 21, "w21")
	b.Queue("SELECT 1/$1::int", 0)
	b.Queue("INSERT INTO batch_t VALUES ($1, $2)", 22, "w22")
	br = c.SendBatch(ctx, b)
	_, err = br.Exec()
	must(err, "failing batch: first insert")
	var x int32
	expectCode(br.QueryRow().Scan(&x), "22012", "failing batch: 1/0")
	_, err = br.Exec()
	if err == nil {
		fail("failing batch: the insert after the error succeeded")
	}
	br.Close()
	eq(one(c, "SELECT count(*) FROM batch_t"), "20", "batch_t after the failing batch")
}

func cursor(c, direct *pgx.Conn) {
	sql := "SELECT id, amount FROM client_facts WHERE qty < 500"
	wantRow := query(direct, "SELECT count(*), sum(id), count(amount), sum(amount) FROM client_facts WHERE qty < 500").decoded[0]
	totals := func(n, idSum, amountCount int64, amountSum *big.Rat, what string) {
		eq([]string{strconv.FormatInt(n, 10), strconv.FormatInt(idSum, 10), strconv.FormatInt(amountCount, 10)},
			wantRow[:3], what+": count, sum(id), count(amount)")
		if amountSum.Cmp(rat(wantRow[3])) != 0 {
			fail("%s: sum(amount)\n    got:  %s\n    want: %s", what, amountSum.FloatString(2), wantRow[3])
		}
	}

	step("DECLARE CURSOR + FETCH 1000 in a transaction: %s", sql)
	tx, err := c.Begin(ctx)
	must(err, "begin")
	_, err = tx.Exec(ctx, "DECLARE pgx_cur NO SCROLL CURSOR FOR "+sql)
	must(err, "declare")
	var n, idSum, amountCount, fetches int64
	amountSum := new(big.Rat)
	for {
		rows, err := tx.Query(ctx, "FETCH 1000 FROM pgx_cur")
		must(err, "fetch")
		got := 0
		for rows.Next() {
			var id int64
			var amount pgtype.Numeric
			must(rows.Scan(&id, &amount), "fetch scan")
			got++
			idSum += id
			if amount.Status == pgtype.Present {
				amountCount++
				amountSum.Add(amountSum, rat(numericString(amount)))
			}
		}
		must(rows.Err(), "fetch")
		if got > 1000 {
			fail("FETCH 1000 returned %d rows", got)
		}
		n += int64(got)
		fetches++
		if got == 0 {
			break
		}
	}
	must(tx.Commit(ctx), "commit")
	totals(n, idSum, amountCount, amountSum, "cursor")
	step("  %d rows in %d fetches, sums equal to direct", n, fetches)

	// pgx has no API for Execute with max_rows; pgconn's message layer can send it
	step("Execute max_rows=1000 / PortalSuspended via pgconn SendBytes/ReceiveMessage: %s", sql)
	_, err = c.Exec(ctx, "BEGIN")
	must(err, "begin")
	pc := c.PgConn()
	var buf []byte
	buf = (&pgproto3.Parse{Query: sql}).Encode(buf)
	buf = (&pgproto3.Bind{DestinationPortal: "pgx_portal", ResultFormatCodes: []int16{0}}).Encode(buf)
	buf = (&pgproto3.Describe{ObjectType: 'P', Name: "pgx_portal"}).Encode(buf)
	execute := (&pgproto3.Execute{Portal: "pgx_portal", MaxRows: 1000}).Encode(nil)
	execute = (&pgproto3.Sync{}).Encode(execute)
	buf = append(buf, execute...)
	n, idSum, amountCount = 0, 0, 0
	amountSum = new(big.Rat)
	suspended, done := 0, false
	for !done {
		must(pc.SendBytes(ctx, buf), "send Execute")
		inPiece := 0
		for {
			msg, err := pc.ReceiveMessage(ctx)
			must(err, "receive")
			switch m := msg.(type) {
			case *pgproto3.DataRow:
				inPiece++
				n++
				id, err := strconv.ParseInt(string(m.Values[0]), 10, 64)
				must(err, "id")
				idSum += id
				if m.Values[1] != nil {
					amountCount++
					amountSum.Add(amountSum, rat(string(m.Values[1])))
				}
			case *pgproto3.PortalSuspended:
				suspended++
			case *pgproto3.CommandComplete:
				done = true
			case *pgproto3.ErrorResponse:
				fail("max_rows read: %s %s", m.Code, m.Message)
			}
			if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
		if inPiece > 1000 {
			fail("Execute max_rows 1000 returned %d rows", inPiece)
		}
		buf = execute
	}
	_, err = c.Exec(ctx, "COMMIT")
	must(err, "commit")
	totals(n, idSum, amountCount, amountSum, "max_rows")
	eq(int64(suspended), (n+999)/1000, "PortalSuspended count")
	step("  %d rows, %d PortalSuspended, sums equal to direct", n, suspended)
}

func copies(c, direct *pgx.Conn) {
	step("CopyFrom (binary), pgconn.CopyFrom (text), pgconn.CopyTo (text, csv, binary)")
	_, err := c.Exec(ctx, "CREATE TEMP TABLE copy_t (id int, amount numeric(12,2), label text)")
	must(err, "create copy_t")
	var src [][]interface{}
	var text strings.Builder
	sum := new(big.Rat)
	chars := 0
	for i := 1; i <= 1000; i++ {
		amount := new(big.Rat).SetFrac64(int64(i)*37-5000, 100)
		label := fmt.Sprintf("row %d", i)
		if i%3 == 0 {
			label += " ü\ttab"
		}
		var num interface{}
		amountText := `\N`
		if i%100 != 0 {
			n := &pgtype.Numeric{}
			must(n.Set(amount.FloatString(2)), "numeric")
			num = n
			amountText = amount.FloatString(2)
			sum.Add(sum, amount)
		}
		src = append(src, []interface{}{int32(i), num, label})
		text.WriteString(fmt.Sprintf("%d\t%s\t%s\n", i, amountText, strings.ReplaceAll(label, "\t", `\t`)))
		chars += len([]rune(label))
	}
	copied, err := c.CopyFrom(ctx, pgx.Identifier{"copy_t"}, []string{"id", "amount", "label"}, pgx.CopyFromRows(src))
	must(err, "CopyFrom")
	eq(copied, int64(1000), "CopyFrom row count")
	check := func(what string) {
		got := query(c, "SELECT count(*), count(amount), sum(amount), sum(id), sum(length(label)) FROM copy_t").decoded[0]
		eq([]string{got[0], got[1], got[3], got[4]}, []string{"1000", "990", "500500", strconv.Itoa(chars)},
			what+": count, count(amount), sum(id), sum(length(label))")
		if rat(got[2]).Cmp(sum) != 0 {
			fail("%s: sum(amount) got %s want %s", what, got[2], sum.FloatString(2))
		}
	}
	check("copy_t after CopyFrom")
	var out bytes.Buffer
	tag, err := c.PgConn().CopyTo(ctx, &out, "COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT")
	must(err, "CopyTo")
	eq(tag.String(), "COPY 1000", "CopyTo tag")
	eq(out.String(), text.String(), "CopyTo text equal to the rows CopyFrom wrote")

	_, err = c.Exec(ctx, "TRUNCATE copy_t")
	must(err, "truncate")
	tag, err = c.PgConn().CopyFrom(ctx, strings.NewReader(text.String()), "COPY copy_t FROM STDIN")
	must(err, "pgconn.CopyFrom")
	eq(tag.String(), "COPY 1000", "pgconn.CopyFrom tag")
	check("copy_t after pgconn.CopyFrom")

	for _, format := range []string{"csv, HEADER", "binary"} {
		sql := "COPY (SELECT * FROM client_facts WHERE id <= 3000 ORDER BY id) TO STDOUT WITH (FORMAT " + format + ")"
		var got, want bytes.Buffer
		_, err := c.PgConn().CopyTo(ctx, &got, sql)
		must(err, "CopyTo "+format)
		_, err = direct.PgConn().CopyTo(ctx, &want, sql)
		must(err, "direct CopyTo "+format)
		if !bytes.Equal(got.Bytes(), want.Bytes()) {
			fail("CopyTo %s differs from direct: %d vs %d bytes", format, got.Len(), want.Len())
		}
	}
}

func rollback(c, direct *pgx.Conn) {
	step("transaction with rollback")
	count := "SELECT count(*) FROM client_kinds WHERE id = 1000"
	tx, err := c.Begin(ctx)
	must(err, "begin")
	tag, err := tx.Exec(ctx, "INSERT INTO client_kinds VALUES (1000, 'rolled back', 1.5, true)")
	must(err, "insert")
	eq(tag.String(), "INSERT 0 1", "insert tag")
	var n int64
	must(tx.QueryRow(ctx, count).Scan(&n), "count in tx")
	eq(n, int64(1), "row visible inside the transaction")
	eq(one(direct, count), "0", "row invisible to the direct connection before rollback")
	must(tx.Rollback(ctx), "rollback")
	eq(one(c, count), "0", "row gone after rollback")
	eq(one(direct, count), "0", "row gone after rollback (direct)")
}

// fanoutInTransaction: fan-out candidates in a transaction, before and after it writes a
// row the answer must include, equal to the direct connection doing the same in its own
// transaction (one after the other).
func fanoutInTransaction(c, direct *pgx.Conn) {
	step("fan-out candidates inside a transaction, before and after it writes")
	agg := aggSQL + " WHERE grp >= $1 GROUP BY grp ORDER BY grp"
	scan := scanSQL + " WHERE qty < $1"
	var answers [2][3]result
	for i, via := range []*pgx.Conn{direct, c} {
		tx, err := via.Begin(ctx)
		must(err, "begin")
		answers[i][0] = query(via, agg, 2)
		_, err = tx.Exec(ctx, "INSERT INTO client_facts VALUES (1000001, 3, 12.34, 1, 'txn row', '2030-01-01 00:00+00')")
		must(err, "insert into client_facts")
		answers[i][1] = query(via, agg, 2)
		answers[i][2] = query(via, scan, 5)
		sortByID(&answers[i][2])
		must(tx.Rollback(ctx), "rollback")
	}
	for j, what := range []string{"aggregate, first statement of the transaction", "aggregate after the insert", "scan after the insert"} {
		eq(answers[1][j].fields, answers[0][j].fields, "in a transaction: "+what+": field descriptions")
		sameRows(answers[1][j].raw, answers[0][j].raw, "in a transaction: "+what)
	}
	if reflect.DeepEqual(answers[1][0].raw, answers[1][1].raw) {
		fail("in a transaction: the insert did not change the aggregate")
	}
	eq(one(direct, "SELECT count(*) FROM client_facts WHERE id = 1000001"), "0", "inserted row rolled back")
}

// fanoutOnTransactionSnapshot: a fan-out candidate in one pgx.Batch after BEGIN ISOLATION
// LEVEL REPEATABLE READ and SET TRANSACTION SNAPSHOT (one Sync) must answer from the
// imported snapshot. A direct connection holds the snapshot while another deletes 200 rows
// spread over the table (id % 1000 = k, k per target) and commits; once the replicas have
// replayed the delete, the answer must still be the holder's. The rows are put back.
func fanoutOnTransactionSnapshot(c *pgx.Conn, directURL string, k int) {
	agg := aggSQL + " GROUP BY grp ORDER BY grp"
	step("fan-out in a batch after BEGIN + SET TRANSACTION SNAPSHOT answers from that snapshot")
	holder, writer := connect(directURL), connect(directURL)
	defer holder.Close(ctx)
	defer writer.Close(ctx)
	htx, err := holder.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	must(err, "holder begin")
	defer htx.Rollback(ctx)
	snapshot := one(holder, "SELECT pg_export_snapshot()")
	_, err = writer.Exec(ctx, fmt.Sprintf("CREATE TEMP TABLE saved AS SELECT * FROM client_facts WHERE id %% 1000 = %d", k))
	must(err, "save rows")
	tag, err := writer.Exec(ctx, fmt.Sprintf("DELETE FROM client_facts WHERE id %% 1000 = %d", k))
	must(err, "delete")
	defer func() {
		_, err := writer.Exec(ctx, "INSERT INTO client_facts SELECT * FROM saved")
		must(err, "put the rows back")
	}()
	eq(tag.String(), "DELETE 200", "delete tag")
	waitForReplicas(one(writer, "SELECT pg_current_wal_lsn()::text"))
	want := query(holder, agg)
	if reflect.DeepEqual(want.raw, query(writer, agg).raw) {
		fail("the delete did not change the aggregate")
	}
	b := &pgx.Batch{}
	b.Queue("BEGIN ISOLATION LEVEL REPEATABLE READ")
	b.Queue("SET TRANSACTION SNAPSHOT '" + snapshot + "'")
	b.Queue(agg)
	br := c.SendBatch(ctx, b)
	_, err = br.Exec()
	must(err, "batch BEGIN")
	_, err = br.Exec()
	must(err, "batch SET TRANSACTION SNAPSHOT")
	rows, err := br.Query()
	must(err, "batch aggregate")
	got := collect(rows, agg)
	must(br.Close(), "batch close")
	_, err = c.Exec(ctx, "ROLLBACK")
	must(err, "rollback")
	eq(got.fields, want.fields, "aggregate with the imported snapshot: field descriptions")
	sameRows(got.decoded, want.decoded, "aggregate in the transaction with the imported snapshot (direct, holding it)")
}

// waitForReplicas waits until every replica in PGFAN_REPLICA_URLS has replayed up to lsn.
func waitForReplicas(lsn string) {
	urls := strings.TrimSpace(os.Getenv("PGFAN_REPLICA_URLS"))
	if urls == "" {
		step("  PGFAN_REPLICA_URLS not set: not waiting for replicas")
		return
	}
	d, err := neturl.Parse(os.Getenv("PGFAN_CLIENT_DIRECT_URL"))
	must(err, "direct URL")
	for _, r := range strings.Split(urls, ",") {
		u, err := neturl.Parse(strings.TrimSpace(r))
		must(err, "replica URL")
		rc := connect(fmt.Sprintf("postgres://%s@%s%s?sslmode=disable", d.User.String(), u.Host, d.Path))
		deadline := time.Now().Add(20 * time.Second)
		for one(rc, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn) != "true" {
			if time.Now().After(deadline) {
				fail("replica %s did not replay %s within 20 s (at %s)", u.Host, lsn,
					one(rc, "SELECT pg_last_wal_replay_lsn()::text"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		rc.Close(ctx)
	}
}

func errorsCheck(c *pgx.Conn) {
	step("SELECT 1/0 -> *pgconn.PgError Code 22012, connection usable")
	_, err := c.Exec(ctx, "SELECT 1/0")
	expectCode(err, "22012", "SELECT 1/0")
	eq(one(c, "SELECT 41 + 1"), "42", "query after the error")
	var x int32
	expectCode(c.QueryRow(ctx, "SELECT 10 / $1::int", 0).Scan(&x), "22012", "SELECT 10 / $1 with 0")
	eq(one(c, "SELECT 41 + 1"), "42", "query after the parameterised error")
	tx, err := c.Begin(ctx)
	must(err, "begin")
	_, err = tx.Exec(ctx, "SELECT 1/0")
	expectCode(err, "22012", "SELECT 1/0 in a transaction")
	_, err = tx.Exec(ctx, "SELECT 1")
	expectCode(err, "25P02", "statement after an error in the transaction")
	must(tx.Rollback(ctx), "rollback")
	eq(one(c, "SELECT 41 + 1"), "42", "query after rollback of the failed transaction")
}

func runTarget(name, url, directURL string, viaPgfan bool, k int) {
	target = name
	start := time.Now()
	c := connect(url)
	defer c.Close(ctx)
	direct := connect(directURL)
	defer direct.Close(ctx)
	_, isTLS := c.PgConn().Conn().(*tls.Conn)
	step("connected: server %s, pid %d, TLS %v", c.PgConn().ParameterStatus("server_version"), c.PgConn().PID(), isTLS)
	eq(isTLS, strings.Contains(url, "sslmode=require"), "the connection is TLS exactly when sslmode=require")
	typed(c, "binary results (pgx default)")
	typed(c, "text results (QueryResultFormats)", pgx.QueryResultFormats{pgx.TextFormatCode})
	fanout(c, direct, viaPgfan, "fan-out aggregate", aggSQL+" GROUP BY grp ORDER BY grp", false, 1)
	fanout(c, direct, viaPgfan, "fan-out aggregate", aggSQL+" WHERE grp >= $1 GROUP BY grp ORDER BY grp", false, 7, 3)
	fanout(c, direct, viaPgfan, "fan-out scan", scanSQL+" WHERE qty < 5", true, 1)
	fanout(c, direct, viaPgfan, "fan-out scan", scanSQL+" WHERE qty < $1", true, 7, 5)
	statementCache(c, direct, url)
	batches(c, direct)
	cursor(c, direct)
	copies(c, direct)
	rollback(c, direct)
	errorsCheck(c)
	fanoutInTransaction(c, direct)
	fanoutOnTransactionSnapshot(c, directURL, k)
	if viaPgfan {
		// pgx's default: Parse/Describe, then Bind/Execute, as an application would send it
		step("EXPLAIN FANOUT through pgx's extended protocol")
		explainFanout(c, false, "fan-out aggregate", aggSQL+" GROUP BY grp ORDER BY grp")
		explainFanout(c, false, "fan-out aggregate", aggSQL+" WHERE grp >= $1 GROUP BY grp ORDER BY grp", 3)
		explainFanout(c, false, "fan-out scan", scanSQL+" WHERE qty < $1", 5)
	}
	step("all checks passed (%.1f s)", time.Since(start).Seconds())
}

func main() {
	direct := os.Getenv("PGFAN_CLIENT_DIRECT_URL")
	targets := [][2]string{
		{"pgfan tls", os.Getenv("PGFAN_CLIENT_TLS_URL")},
		{"pgfan plain", os.Getenv("PGFAN_CLIENT_PLAIN_URL")},
		{"direct", direct},
	}
	for i, t := range targets {
		k := 37 + 10*i // rows the snapshot check deletes and puts back: different per target
		if t[1] == "" || direct == "" {
			fmt.Println("FAIL: PGFAN_CLIENT_TLS_URL, _PLAIN_URL and _DIRECT_URL must be set (tests/clients/run)")
			os.Exit(2)
		}
		func() {
			defer func() {
				if r := recover(); r != nil {
					if f, ok := r.(failure); ok {
						fmt.Printf("FAIL [%s] %s\n", target, f.msg)
						os.Exit(1)
					}
					panic(r)
				}
			}()
			runTarget(t[0], t[1], direct, t[0] != "direct", k)
		}()
	}
	fmt.Println("pgx: all targets passed")
}
