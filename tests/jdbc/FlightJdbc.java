// Runs one query through the Arrow Flight SQL JDBC driver (what DBeaver and other JDBC tools
// load) and prints its rows, one per line, columns separated by " | " (for tests/tests/flight_sql.rs).
//
// usage: java -cp flight-sql-jdbc-driver.jar FlightJdbc.java HOST:PORT TOKEN SQL
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.Properties;

public class FlightJdbc {
    public static void main(String[] args) throws Exception {
        // load the driver by name: if its initialization fails, this says why (DriverManager's
        // service lookup skips such a driver and reports only "No suitable driver")
        Class.forName("org.apache.arrow.driver.jdbc.ArrowFlightJdbcDriver");
        Properties props = new Properties();
        props.setProperty("token", args[1]);
        props.setProperty("useEncryption", "false");
        try (Connection c = DriverManager.getConnection("jdbc:arrow-flight-sql://" + args[0], props);
             Statement s = c.createStatement();
             ResultSet r = s.executeQuery(args[2])) {
            int n = r.getMetaData().getColumnCount();
            while (r.next()) {
                StringBuilder line = new StringBuilder();
                for (int i = 1; i <= n; i++) {
                    if (i > 1) line.append(" | ");
                    line.append(r.getString(i));
                }
                System.out.println(line);
            }
        }
    }
}
