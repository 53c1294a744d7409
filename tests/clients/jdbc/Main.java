/*
 * pgjdbc (Debian libpostgresql-jdbc-java) through pgfan; see tests/clients/README.md.
 * Run by ./run as `java -cp /usr/share/java/postgresql.jar Main.java`.
 *
 * For each target (pgfan with SCRAM over TLS, pgfan with SCRAM without TLS, the primary
 * directly) it checks, against a second connection straight to the primary where data is
 * compared:
 *  - typed results over the common types, in text (default) and binary (prepareThreshold=-1)
 *    result format, and bound parameters of those types read back unchanged;
 *  - a fan-out aggregate and a fan-out scan, with literals and with a `?` parameter, equal
 *    to the direct answer (values as strings, column types too). Through pgfan the route is
 *    asserted with EXPLAIN FANOUT (simple protocol here; pgjdbc's own extended protocol as
 *    the last check) and with pgfan_queries_total{route="fanout"} rising by one per execution. The parameterised ones run 7 times, so pgjdbc moves to a named
 *    statement with binary results;
 *  - prepareThreshold: no server statement after 3 executions, a named S_n one (seen in
 *    pg_prepared_statements) after the 5th; prepareThreshold=1 names it at once;
 *  - executeBatch: 100 inserts and 40 updates (many Executes per Sync), and a failing batch
 *    (23505) that leaves nothing behind;
 *  - setFetchSize(1000) with autocommit off: the portal (C_n) is open in pg_cursors while
 *    reading, count and sums equal the direct aggregate;
 *  - CopyManager copyIn / copyOut (text, csv and binary, the latter two equal to direct);
 *  - a transaction with rollback; fan-out candidates inside a transaction, as its first
 *    statement (BEGIN pipelined with it) and after it wrote a row the answer must include;
 *    and pipelined after BEGIN + SET TRANSACTION SNAPSHOT, where it must answer from the
 *    imported snapshot after another session deleted rows and the replicas replayed that;
 *  - SELECT 1/0 -> SQLException.getSQLState() "22012" (plain, bound parameter, inside a
 *    transaction where the next statement gets 25P02); the connection stays usable.
 * Prints each check and exits 1 at the first failure, saying what differed.
 */

import java.io.ByteArrayOutputStream;
import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.net.URI;
import java.net.URLDecoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.time.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.PGResultSetMetaData;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PGInterval;

public class Main {
    static String target;

    static final class Failure extends RuntimeException {
        Failure(String m) { super(m); }
    }

    static void check(boolean ok, String what, Object got, Object want) {
        if (!ok) throw new Failure(what + "\n    got:  " + show(got) + "\n    want: " + show(want));
    }

    static void eq(Object got, Object want, String what) {
        check(Objects.deepEquals(got, want), what, got, want);
    }

    static String show(Object o) {
        if (o instanceof Object[] a) return Arrays.deepToString(a);
        if (o instanceof byte[] b) return HexFormat.of().formatHex(b);
        String s = String.valueOf(o);
        return s.length() > 600 ? s.substring(0, 600) + "... (" + s.length() + " chars)" : s;
    }

    static void step(String what) {
        System.out.println("[" + target + "] " + what);
    }

    // ------------------------------------------------------------------ connections

    /** postgres://user:pw@host:port/db?k=v -> a pgjdbc connection, with extra properties. */
    static Connection connect(String url, String... props) throws Exception {
        URI u = URI.create(url);
        String[] userInfo = u.getRawUserInfo().split(":", 2);
        Properties p = new Properties();
        p.setProperty("user", URLDecoder.decode(userInfo[0], StandardCharsets.UTF_8));
        p.setProperty("password", URLDecoder.decode(userInfo[1], StandardCharsets.UTF_8));
        for (int i = 0; i < props.length; i += 2) p.setProperty(props[i], props[i + 1]);
        String jdbc = "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getRawPath()
                + (u.getRawQuery() == null ? "" : "?" + u.getRawQuery());
        return DriverManager.getConnection(jdbc, p);
    }

    static void bind(PreparedStatement ps, Object... params) throws SQLException {
        for (int i = 0; i < params.length; i++) ps.setObject(i + 1, params[i]);
    }

    /** Rows as strings (getString), the exact text pgjdbc gives for each value. */
    static List<List<String>> rows(ResultSet rs) throws SQLException {
        int n = rs.getMetaData().getColumnCount();
        List<List<String>> out = new ArrayList<>();
        while (rs.next()) {
            List<String> row = new ArrayList<>(n);
            for (int i = 1; i <= n; i++) row.add(rs.getString(i));
            out.add(row);
        }
        return out;
    }

    static List<String> columns(ResultSet rs) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        List<String> out = new ArrayList<>();
        for (int i = 1; i <= md.getColumnCount(); i++)
            out.add(md.getColumnLabel(i) + " " + md.getColumnTypeName(i));
        return out;
    }

    static List<List<String>> query(Connection c, String sql, Object... params) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            bind(ps, params);
            try (ResultSet rs = ps.executeQuery()) {
                return rows(rs);
            }
        }
    }

    static String one(Connection c, String sql, Object... params) throws SQLException {
        List<List<String>> r = query(c, sql, params);
        check(r.size() == 1 && r.get(0).size() == 1, "one value from " + sql, r, "one row, one column");
        return r.get(0).get(0);
    }

    interface Sql { void run() throws SQLException; }

    static SQLException expectError(String state, String what, Sql body) {
        try {
            body.run();
        } catch (SQLException e) {
            check(state.equals(e.getSQLState()), what + ": SQLState (" + e.getMessage() + ")", e.getSQLState(), state);
            return e;
        }
        throw new Failure(what + ": no SQLException, want SQLState " + state);
    }

    // ------------------------------------------------------------------ pgfan metrics

    static final HttpClient HTTP = HttpClient.newHttpClient();

    static long fanoutCount() throws Exception {
        String url = System.getenv("PGFAN_CLIENT_METRICS_URL");
        String body = HTTP.send(HttpRequest.newBuilder(URI.create(url)).build(),
                HttpResponse.BodyHandlers.ofString()).body();
        for (String line : body.split("\n"))
            if (line.startsWith("pgfan_queries_total{route=\"fanout\"}"))
                return (long) Double.parseDouble(line.substring(line.lastIndexOf(' ') + 1));
        return 0;
    }

    // ------------------------------------------------------------------ checks

    static final String TYPES_SQL = "SELECT true AS bool, 32767::int2 AS i2, '-2147483648'::int4 AS i4,"
            + " 9223372036854775807::int8 AS i8, 12345.678901234567890::numeric AS num,"
            + " -0.000123::numeric(10,6) AS num_small, 1.5::float4 AS f4, -2.25::float8 AS f8,"
            + " 'text ü €'::text AS txt, 'vc'::varchar(10) AS vc, '\\xdeadbeef00'::bytea AS bin,"
            + " '2024-02-29'::date AS d, '13:45:56.123456'::time AS t,"
            + " '2024-02-29 13:45:56.123456'::timestamp AS ts,"
            + " '2024-02-29 13:45:56.123456+02'::timestamptz AS tstz,"
            + " '1 year 2 mons 3 days 04:05:06.5'::interval AS iv,"
            + " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,"
            + " '{\"a\": [1, 2]}'::json AS js, '{\"b\": {\"c\": null}}'::jsonb AS jsb,"
            + " ARRAY[1, 2, NULL, 4]::int[] AS ia, ARRAY['x', 'y z', NULL]::text[] AS ta, NULL::int AS nul";

    static void typed(Connection c, String mode, boolean binary) throws Exception {
        step("typed results, " + mode);
        try (PreparedStatement ps = c.prepareStatement(TYPES_SQL); ResultSet rs = ps.executeQuery()) {
            check(rs.next(), "typed results: a row", "no row", "one row");
            PGResultSetMetaData md = rs.getMetaData().unwrap(PGResultSetMetaData.class);
            // int8 column: binary with prepareThreshold=-1, text otherwise
            eq(md.getFormat(4), binary ? 1 : 0, "result format of the int8 column (" + mode + ")");
            eq(rs.getObject("bool"), Boolean.TRUE, "bool");
            eq(rs.getShort("i2"), (short) 32767, "int2");
            eq(rs.getInt("i4"), Integer.MIN_VALUE, "int4");
            eq(rs.getLong("i8"), Long.MAX_VALUE, "int8");
            eq(rs.getBigDecimal("num"), new BigDecimal("12345.678901234567890"), "numeric");
            eq(rs.getBigDecimal("num_small"), new BigDecimal("-0.000123"), "numeric(10,6)");
            eq(rs.getFloat("f4"), 1.5f, "float4");
            eq(rs.getDouble("f8"), -2.25, "float8");
            eq(rs.getString("txt"), "text ü €", "text");
            eq(rs.getString("vc"), "vc", "varchar");
            eq(rs.getBytes("bin"), HexFormat.of().parseHex("deadbeef00"), "bytea");
            eq(rs.getObject("d", LocalDate.class), LocalDate.of(2024, 2, 29), "date");
            eq(rs.getObject("t", LocalTime.class), LocalTime.parse("13:45:56.123456"), "time");
            eq(rs.getObject("ts", LocalDateTime.class), LocalDateTime.parse("2024-02-29T13:45:56.123456"), "timestamp");
            OffsetDateTime tstz = rs.getObject("tstz", OffsetDateTime.class);
            check(tstz != null && tstz.isEqual(OffsetDateTime.parse("2024-02-29T13:45:56.123456+02:00")),
                    "timestamptz", tstz, "2024-02-29T13:45:56.123456+02:00");
            eq(rs.getObject("iv"), new PGInterval(1, 2, 3, 4, 5, 6.5), "interval");
            eq(rs.getObject("id"), UUID.fromString("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "uuid");
            eq(rs.getString("js"), "{\"a\": [1, 2]}", "json");
            eq(rs.getString("jsb"), "{\"b\": {\"c\": null}}", "jsonb");
            eq(rs.getArray("ia").getArray(), new Integer[] {1, 2, null, 4}, "int[]");
            eq(rs.getArray("ta").getArray(), new String[] {"x", "y z", null}, "text[]");
            rs.getInt("nul");
            check(rs.wasNull(), "NULL::int wasNull", false, true);
            check(!rs.next(), "typed results: one row only", "a second row", "no more rows");
        }
        // bound parameters of the common types come back unchanged
        String sql = "SELECT ?::int8, ?::numeric, ?::text, ?::bytea, ?::date, ?::timestamptz, ?::uuid, ?::float8, ?::bool";
        OffsetDateTime at = OffsetDateTime.parse("2001-02-03T04:05:06.789012Z");
        UUID uuid = UUID.fromString("123e4567-e89b-12d3-a456-426614174000");
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int i = 0; i < 7; i++) { // past prepareThreshold: named statement, binary results
                bind(ps, -42L, new BigDecimal("-98765.4321000"), "it's \"quoted\"", new byte[] {0, 1, (byte) 255},
                        LocalDate.of(1999, 12, 31), at, uuid, 0.1, false);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    eq(rs.getLong(1), -42L, "bound int8");
                    eq(rs.getBigDecimal(2), new BigDecimal("-98765.4321000"), "bound numeric");
                    eq(rs.getString(3), "it's \"quoted\"", "bound text");
                    eq(rs.getBytes(4), new byte[] {0, 1, (byte) 255}, "bound bytea");
                    eq(rs.getObject(5, LocalDate.class), LocalDate.of(1999, 12, 31), "bound date");
                    OffsetDateTime got = rs.getObject(6, OffsetDateTime.class);
                    check(got != null && got.isEqual(at), "bound timestamptz", got, at);
                    eq(rs.getObject(7), uuid, "bound uuid");
                    eq(rs.getDouble(8), 0.1, "bound float8");
                    eq(rs.getBoolean(9), false, "bound bool");
                }
            }
        }
    }

    static final String AGG = "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts";
    static final String SCAN = "SELECT id, amount, label FROM client_facts";

    /** Runs sql (with params) through c and direct; equal columns and rows; route asserted. */
    /** EXPLAIN FANOUT sql must answer a first row starting with "FanOut:". */
    static void explainFanout(Connection via, String how, String name, String sql, Object... params) throws Exception {
        List<List<String>> plan = query(via, "EXPLAIN FANOUT " + sql, params);
        check(!plan.isEmpty() && plan.get(0).get(0).startsWith("FanOut:"), name + ": EXPLAIN FANOUT (" + how
                + ") first row", plan.isEmpty() ? "no rows" : plan.get(0).get(0), "FanOut: ...");
    }

    static void fanout(Connection c, Connection simple, Connection direct, boolean viaPgfan, String name, String sql,
            boolean sortById, int runs, Object... params) throws Exception {
        step(name + ": " + sql + (params.length > 0 ? "  with " + Arrays.toString(params) : "")
                + (runs > 1 ? "  x" + runs : ""));
        if (viaPgfan) explainFanout(simple, "preferQueryMode=simple", name, sql, params);
        List<String> wantCols;
        List<List<String>> want;
        try (PreparedStatement ps = direct.prepareStatement(sql)) {
            bind(ps, params);
            try (ResultSet rs = ps.executeQuery()) {
                wantCols = columns(rs);
                want = rows(rs);
            }
        }
        Comparator<List<String>> byId = Comparator.comparingLong(r -> Long.parseLong(r.get(0)));
        if (sortById) want.sort(byId);
        check(!want.isEmpty(), name + ": direct answer has rows", want.size(), "> 0");
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            for (int run = 1; run <= runs; run++) {
                bind(ps, params);
                long before = viaPgfan ? fanoutCount() : 0;
                List<String> cols;
                List<List<String>> got;
                try (ResultSet rs = ps.executeQuery()) {
                    cols = columns(rs);
                    got = rows(rs);
                }
                if (viaPgfan) {
                    long delta = fanoutCount() - before;
                    check(delta == 1, name + " run " + run + ": pgfan_queries_total{route=\"fanout\"} increase", delta, 1);
                }
                if (sortById) got.sort(byId);
                eq(cols, wantCols, name + " run " + run + ": columns");
                if (!got.equals(want)) {
                    int i = 0;
                    while (i < Math.min(got.size(), want.size()) && got.get(i).equals(want.get(i))) i++;
                    throw new Failure(name + " run " + run + ": rows differ from direct (" + got.size() + " vs "
                            + want.size() + " rows), first difference at row " + i + "\n    got:  "
                            + (i < got.size() ? got.get(i) : "none") + "\n    want: " + (i < want.size() ? want.get(i) : "none"));
                }
            }
            if (runs > 5) {
                PGStatement pgs = ps.unwrap(PGStatement.class);
                check(pgs.isUseServerPrepare(), name + ": pgjdbc uses a named server statement", false, true);
            }
        }
    }

    static void prepareThreshold(Connection c, Connection direct, String url) throws Exception {
        String sql = "SELECT name, weight, active FROM client_kinds WHERE id = ?";
        String serverSql = sql.replace("?", "$1");
        String named = "SELECT name FROM pg_prepared_statements WHERE statement = ?";
        step("prepareThreshold 5: " + sql + " x10");
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            eq(ps.unwrap(PGStatement.class).getPrepareThreshold(), 5, "default prepareThreshold");
            for (int i = 0; i < 10; i++) {
                bind(ps, i);
                List<List<String>> got;
                try (ResultSet rs = ps.executeQuery()) {
                    got = rows(rs);
                }
                eq(got, query(direct, sql, i), "client_kinds id " + i + " equal to direct");
                if (i == 2)
                    eq(query(c, named, serverSql), List.of(), "pg_prepared_statements after 3 executions");
            }
            List<List<String>> names = query(c, named, serverSql);
            check(names.size() == 1 && names.get(0).get(0).startsWith("S_"),
                    "pg_prepared_statements after 10 executions", names, "[[S_n]]");
            step("named statement " + names.get(0).get(0) + " in pg_prepared_statements");
        }
        step("prepareThreshold=1: named at the first execution");
        try (Connection c1 = connect(url, "prepareThreshold", "1");
                PreparedStatement ps = c1.prepareStatement(sql)) {
            bind(ps, 7);
            try (ResultSet rs = ps.executeQuery()) {
                eq(rows(rs), query(direct, sql, 7), "client_kinds id 7 equal to direct");
            }
            List<List<String>> names = query(c1, named, serverSql);
            check(names.size() == 1 && names.get(0).get(0).startsWith("S_"),
                    "pg_prepared_statements after 1 execution with prepareThreshold=1", names, "[[S_n]]");
        }
    }

    static void batches(Connection c) throws Exception {
        step("executeBatch: 100 inserts, 40 updates, a failing batch");
        try (Statement st = c.createStatement()) {
            st.execute("CREATE TEMP TABLE batch_t (id int PRIMARY KEY, v text)");
        }
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO batch_t VALUES (?, ?)")) {
            for (int i = 1; i <= 100; i++) {
                ins.setInt(1, i);
                ins.setString(2, "v" + i);
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            eq(counts.length, 100, "insert batch: update counts");
            for (int n : counts) eq(n, 1, "insert batch: each update count");
        }
        try (Statement st = c.createStatement()) {
            for (int i = 1; i <= 40; i++) st.addBatch("UPDATE batch_t SET v = v || '+' WHERE id = " + i);
            int[] counts = st.executeBatch();
            eq(counts.length, 40, "update batch: update counts");
            for (int n : counts) eq(n, 1, "update batch: each update count");
        }
        String summary = "SELECT count(*), sum(id), count(*) FILTER (WHERE v LIKE 'v%+'), count(*) FILTER (WHERE v = 'v' || id) FROM batch_t";
        eq(query(c, summary), List.of(List.of("100", "5050", "40", "60")), "batch_t after the batches");
        // autocommit: the whole batch is one implicit transaction up to its Sync
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO batch_t VALUES (?, ?)")) {
            for (int i = 101; i <= 140; i++) {
                ins.setInt(1, i == 120 ? 50 : i); // the 20th collides with id 50
                ins.setString(2, "w" + i);
                ins.addBatch();
            }
            expectError("23505", "failing batch", ins::executeBatch);
        }
        eq(query(c, summary), List.of(List.of("100", "5050", "40", "60")), "batch_t after the failing batch");
    }

    static void fetchSize(Connection c, Connection direct) throws Exception {
        String sql = "SELECT id, amount FROM client_facts WHERE qty < 500";
        step("setFetchSize(1000), autocommit off: " + sql);
        c.setAutoCommit(false);
        long n = 0, idSum = 0, amountCount = 0;
        BigDecimal amountSum = BigDecimal.ZERO;
        List<List<String>> cursors = null;
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            ps.setFetchSize(1000);
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    n++;
                    idSum += rs.getLong(1);
                    BigDecimal a = rs.getBigDecimal(2);
                    if (a != null) {
                        amountCount++;
                        amountSum = amountSum.add(a);
                    }
                    if (n == 1500) // the driver's portal is open between fetches
                        cursors = query(c, "SELECT name FROM pg_cursors WHERE name LIKE 'C\\_%'");
                }
            }
        }
        c.commit();
        c.setAutoCommit(true);
        check(cursors != null && cursors.size() == 1, "an open C_n portal in pg_cursors while reading", cursors, "[[C_n]]");
        List<String> want = query(direct,
                "SELECT count(*), sum(id), count(amount), sum(amount) FROM client_facts WHERE qty < 500").get(0);
        eq(List.of(String.valueOf(n), String.valueOf(idSum), String.valueOf(amountCount), amountSum.toPlainString()),
                want, "rows read with fetch size 1000: count, sum(id), count(amount), sum(amount)");
        step("  " + n + " rows in pieces of 1000, sums equal to direct");
    }

    static void copy(Connection c, Connection direct) throws Exception {
        step("CopyManager copyIn / copyOut");
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        try (Statement st = c.createStatement()) {
            st.execute("CREATE TEMP TABLE copy_t (id int, amount numeric(12,2), label text)");
        }
        StringBuilder in = new StringBuilder();
        BigDecimal sum = BigDecimal.ZERO;
        long chars = 0;
        for (int i = 1; i <= 1000; i++) {
            BigDecimal amount = BigDecimal.valueOf(i * 37L - 5000, 2);
            String label = "row " + i + (i % 3 == 0 ? " ü\\ttab" : "");
            in.append(i).append('\t').append(i % 100 == 0 ? "\\N" : amount.toPlainString()).append('\t')
                    .append(label).append('\n');
            if (i % 100 != 0) sum = sum.add(amount);
            chars += label.replace("\\t", "\t").length();
        }
        long copied = cm.copyIn("COPY copy_t FROM STDIN", new StringReader(in.toString()));
        eq(copied, 1000L, "copyIn row count");
        eq(query(c, "SELECT count(*), count(amount), sum(amount), sum(id), sum(length(label)) FROM copy_t"),
                List.of(List.of("1000", "990", sum.toPlainString(), "500500", String.valueOf(chars))),
                "copy_t after copyIn: count, count(amount), sum(amount), sum(id), sum(length(label))");
        StringWriter out = new StringWriter();
        eq(cm.copyOut("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT", out), 1000L, "copyOut row count");
        eq(out.toString(), in.toString(), "copyOut text equal to what copyIn wrote");

        CopyManager dm = direct.unwrap(PGConnection.class).getCopyAPI();
        String csv = "COPY (SELECT * FROM client_facts WHERE id <= 3000 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)";
        StringWriter got = new StringWriter(), want = new StringWriter();
        cm.copyOut(csv, got);
        dm.copyOut(csv, want);
        eq(got.toString(), want.toString(), "copyOut csv equal to direct");
        String bin = "COPY (SELECT * FROM client_facts WHERE id <= 3000 ORDER BY id) TO STDOUT WITH (FORMAT binary)";
        ByteArrayOutputStream gotB = new ByteArrayOutputStream(), wantB = new ByteArrayOutputStream();
        cm.copyOut(bin, gotB);
        dm.copyOut(bin, wantB);
        check(Arrays.equals(gotB.toByteArray(), wantB.toByteArray()), "copyOut binary equal to direct",
                gotB.size() + " bytes", wantB.size() + " bytes");
    }

    static void rollback(Connection c, Connection direct) throws Exception {
        step("transaction with rollback");
        String count = "SELECT count(*) FROM client_kinds WHERE id = 1000";
        c.setAutoCommit(false);
        try (Statement st = c.createStatement()) {
            eq(st.executeUpdate("INSERT INTO client_kinds VALUES (1000, 'rolled back', 1.5, true)"), 1, "insert count");
        }
        eq(one(c, count), "1", "row visible inside the transaction");
        eq(one(direct, count), "0", "row invisible to the direct connection before rollback");
        c.rollback();
        c.setAutoCommit(true);
        eq(one(c, count), "0", "row gone after rollback");
        eq(one(direct, count), "0", "row gone after rollback (direct)");
    }

    /**
     * Fan-out candidates inside a transaction: first statement of the transaction (pgjdbc
     * sends BEGIN in the same pipeline), then after the transaction wrote a row, which the
     * answer must include (compared with the direct connection doing the same in its own
     * transaction, one after the other).
     */
    static void fanoutInTransaction(Connection c, Connection direct) throws Exception {
        step("fan-out candidates inside a transaction, before and after it writes");
        String agg = AGG + " WHERE grp >= ? GROUP BY grp ORDER BY grp";
        String scan = SCAN + " WHERE qty < ?";
        String insert = "INSERT INTO client_facts VALUES (1000001, 3, 12.34, 1, 'txn row', '2030-01-01 00:00+00')";
        List<List<List<String>>> want = new ArrayList<>();
        List<List<List<String>>> got = new ArrayList<>();
        for (Connection via : new Connection[] {direct, c}) {
            List<List<List<String>>> out = via == direct ? want : got;
            via.setAutoCommit(false);
            out.add(query(via, agg, 2));
            try (Statement st = via.createStatement()) {
                eq(st.executeUpdate(insert), 1, "insert into client_facts");
            }
            out.add(query(via, agg, 2));
            List<List<String>> rows = query(via, scan, 5);
            rows.sort(Comparator.comparingLong(r -> Long.parseLong(r.get(0))));
            out.add(rows);
            via.rollback();
            via.setAutoCommit(true);
        }
        String[] what = {"aggregate, first statement of the transaction", "aggregate after the insert",
            "scan after the insert"};
        for (int i = 0; i < what.length; i++) eq(got.get(i), want.get(i), "in a transaction: " + what[i]);
        check(!got.get(1).equals(got.get(0)), "in a transaction: the insert changes the aggregate", got.get(1), "a changed grp 3 row");
        eq(one(direct, "SELECT count(*) FROM client_facts WHERE id = 1000001"), "0", "inserted row rolled back");
    }

    /**
     * A fan-out candidate pipelined after BEGIN and SET TRANSACTION SNAPSHOT (one Sync: pgjdbc
     * sends BEGIN and each part of a multi-statement string in the same batch) must answer
     * from the imported snapshot. A direct connection holds the snapshot while another
     * deletes 200 rows spread over the table (id % 1000 = k, k per target) and commits; once
     * the replicas have replayed the delete, the answer must still be the holder's. The rows
     * are put back afterwards.
     */
    static void fanoutOnTransactionSnapshot(Connection c, String directUrl, int k) throws Exception {
        String agg = AGG + " GROUP BY grp ORDER BY grp";
        step("fan-out pipelined after BEGIN + SET TRANSACTION SNAPSHOT answers from that snapshot");
        try (Connection holder = connect(directUrl); Connection writer = connect(directUrl);
                Statement w = writer.createStatement()) {
            holder.setAutoCommit(false);
            holder.setTransactionIsolation(Connection.TRANSACTION_REPEATABLE_READ);
            String snapshot = one(holder, "SELECT pg_export_snapshot()");
            w.execute("CREATE TEMP TABLE saved AS SELECT * FROM client_facts WHERE id % 1000 = " + k);
            eq(w.executeUpdate("DELETE FROM client_facts WHERE id % 1000 = " + k), 200, "delete count");
            try {
                waitForReplicas(one(writer, "SELECT pg_current_wal_lsn()"));
                List<List<String>> want = query(holder, agg);
                check(!want.equals(query(writer, agg)), "the delete changes the aggregate", "unchanged", "changed");
                c.setAutoCommit(false);
                c.setTransactionIsolation(Connection.TRANSACTION_REPEATABLE_READ);
                List<List<String>> got;
                try (Statement st = c.createStatement()) {
                    check(!st.execute("SET TRANSACTION SNAPSHOT '" + snapshot + "'; " + agg), "SET result", "rows", "no rows");
                    check(st.getMoreResults(), "the aggregate's result", "none", "a result set");
                    try (ResultSet rs = st.getResultSet()) {
                        got = rows(rs);
                    }
                }
                c.rollback();
                c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
                c.setAutoCommit(true);
                eq(got, want, "aggregate in the transaction with the imported snapshot (direct, holding it)");
            } finally {
                w.executeUpdate("INSERT INTO client_facts SELECT * FROM saved");
                holder.rollback();
            }
        }
    }

    /** Waits until every replica in PGFAN_REPLICA_URLS has replayed the primary's WAL up to lsn. */
    static void waitForReplicas(String lsn) throws Exception {
        String urls = System.getenv("PGFAN_REPLICA_URLS");
        if (urls == null || urls.isBlank()) {
            step("  PGFAN_REPLICA_URLS not set: not waiting for replicas");
            return;
        }
        URI d = URI.create(System.getenv("PGFAN_CLIENT_DIRECT_URL"));
        for (String r : urls.split(",")) {
            URI u = URI.create(r.trim());
            String url = d.getScheme() + "://" + d.getRawUserInfo() + "@" + u.getHost() + ":" + u.getPort()
                    + d.getRawPath() + "?sslmode=disable";
            try (Connection rc = connect(url)) {
                long deadline = System.nanoTime() + 20_000_000_000L;
                while (!one(rc, "SELECT pg_last_wal_replay_lsn() >= ?::pg_lsn", lsn).equals("t")) {
                    check(System.nanoTime() < deadline, "replica " + u.getPort() + " replays " + lsn + " within 20 s",
                            one(rc, "SELECT pg_last_wal_replay_lsn()::text"), lsn);
                    Thread.sleep(20);
                }
            }
        }
    }

    static void errors(Connection c) throws Exception {
        step("SELECT 1/0 -> SQLState 22012, connection usable");
        try (Statement st = c.createStatement()) {
            expectError("22012", "SELECT 1/0", () -> st.executeQuery("SELECT 1/0"));
        }
        eq(one(c, "SELECT 41 + 1"), "42", "query after the error");
        expectError("22012", "SELECT 10 / ? with 0", () -> query(c, "SELECT 10 / ?", 0));
        eq(one(c, "SELECT 41 + 1"), "42", "query after the parameterised error");
        c.setAutoCommit(false);
        expectError("22012", "SELECT 1/0 in a transaction", () -> query(c, "SELECT 1/0"));
        expectError("25P02", "statement after an error in the transaction", () -> query(c, "SELECT 1"));
        c.rollback();
        c.setAutoCommit(true);
        eq(one(c, "SELECT 41 + 1"), "42", "query after rollback of the failed transaction");
    }

    static void runTarget(String name, String url, String directUrl, boolean viaPgfan, int k) throws Exception {
        target = name;
        long start = System.nanoTime();
        try (Connection c = connect(url); Connection direct = connect(directUrl);
                Connection simple = connect(url, "preferQueryMode", "simple")) {
            step("connected: " + c.getMetaData().getDatabaseProductVersion() + ", driver "
                    + c.getMetaData().getDriverVersion());
            typed(c, "text results (default)", false);
            try (Connection bin = connect(url, "prepareThreshold", "-1")) {
                typed(bin, "binary results (prepareThreshold=-1)", true);
            }
            fanout(c, simple, direct, viaPgfan, "fan-out aggregate", AGG + " GROUP BY grp ORDER BY grp", false, 1);
            fanout(c, simple, direct, viaPgfan, "fan-out aggregate", AGG + " WHERE grp >= ? GROUP BY grp ORDER BY grp", false, 7, 3);
            fanout(c, simple, direct, viaPgfan, "fan-out scan", SCAN + " WHERE qty < 5", true, 1);
            fanout(c, simple, direct, viaPgfan, "fan-out scan", SCAN + " WHERE qty < ?", true, 7, 5);
            prepareThreshold(c, direct, url);
            batches(c);
            fetchSize(c, direct);
            copy(c, direct);
            rollback(c, direct);
            errors(c);
            fanoutInTransaction(c, direct);
            fanoutOnTransactionSnapshot(c, directUrl, k);
            if (viaPgfan) {
                // pgjdbc's default: Parse/Bind/Describe/Execute, as an application would send it
                step("EXPLAIN FANOUT through pgjdbc's extended protocol");
                explainFanout(c, "extended protocol", "fan-out aggregate", AGG + " GROUP BY grp ORDER BY grp");
                explainFanout(c, "extended protocol", "fan-out aggregate", AGG + " WHERE grp >= ? GROUP BY grp ORDER BY grp", 3);
                explainFanout(c, "extended protocol", "fan-out scan", SCAN + " WHERE qty < ?", 5);
            }
        }
        step(String.format("all checks passed (%.1f s)", (System.nanoTime() - start) / 1e9));
    }

    public static void main(String[] args) throws Exception {
        String direct = System.getenv("PGFAN_CLIENT_DIRECT_URL");
        String[][] targets = {
            {"pgfan tls", System.getenv("PGFAN_CLIENT_TLS_URL")},
            {"pgfan plain", System.getenv("PGFAN_CLIENT_PLAIN_URL")},
            {"direct", direct},
        };
        int k = 7;
        for (String[] t : targets) {
            if (t[1] == null || direct == null) {
                System.out.println("FAIL: PGFAN_CLIENT_TLS_URL, _PLAIN_URL and _DIRECT_URL must be set (tests/clients/run)");
                System.exit(2);
            }
            try {
                runTarget(t[0], t[1], direct, !t[0].equals("direct"), k);
                k += 10;
            } catch (Failure e) {
                System.out.println("FAIL [" + target + "] " + e.getMessage());
                System.exit(1);
            } catch (Exception e) {
                String state = e instanceof SQLException q ? " (SQLState " + q.getSQLState() + ")" : "";
                System.out.println("FAIL [" + target + "] " + e + state);
                for (StackTraceElement f : e.getStackTrace())
                    if (f.getClassName().equals("Main")) System.out.println("    at Main." + f.getMethodName() + " line " + f.getLineNumber());
                System.exit(1);
            }
        }
        System.out.println("jdbc: all targets passed");
    }
}
