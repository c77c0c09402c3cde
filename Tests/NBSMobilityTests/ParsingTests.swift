import ArgumentParser
import Testing

@testable import nbs_mobility

@Suite struct ParsingTests {
    @Test func peers() throws {
        #expect(try parsePeer("server.example:7000") == ("server.example", 7000))
        #expect(try parsePeer("[2001:db8::1]:443") == ("2001:db8::1", 443))
        for bad in ["server.example", "server.example:0", "server.example:65536", ":80", "server.example:http"] {
            #expect(throws: ValidationError.self, "\(bad)") { try parsePeer(bad) }
        }
    }

    @Test func byteCounts() {
        #expect(parseByteCount("16M") == 16 << 20)
        #expect(parseByteCount("64MiB") == 64 << 20)
        #expect(parseByteCount("1G") == 1 << 30)
        #expect(parseByteCount("1048576") == 1_048_576)
        #expect(parseByteCount("lots") == nil)
        #expect(parseByteCount("-5") == nil)
    }

    @Test func commandsParseAndValidate() throws {
        #expect(try NBSMobility.parseAsRoot(["serve", "--name", "s.test", "--port", "7000", "--sink"]) is Serve)
        #expect(try NBSMobility.parseAsRoot(["connect", "--name", "c.test", "s.test:7000", "--bytes", "1M", "--view", "lines"]) is Connect)
        #expect(try NBSMobility.parseAsRoot(["cat", "--listen", "--name", "s.test", "--port", "7000"]) is Cat)
        #expect(try NBSMobility.parseAsRoot(["cat", "--name", "c.test", "s.test:7000", "--json"]) is Cat)
        #expect(try NBSMobility.parseAsRoot(["status", "--json"]) is Status)
        #expect(try NBSMobility.parseAsRoot(["identity", "--show", "/tmp/k", "--json"]) is Identity)
        #expect(try NBSMobility.parseAsRoot(["monitor", "--json"]) is Monitor)
        let connect = try #require(try NBSMobility.parseAsRoot(["connect", "--name", "c.test", "s.test:7000", "--duration", "2"]) as? Connect)
        #expect(connect.display.view == .auto)
        #expect(!connect.display.noControl)
    }

    @Test(arguments: [
        ["serve", "--name", "s.test", "--port", "7000"],                          // neither --sink nor --echo
        ["serve", "--name", "s.test", "--port", "70000", "--sink"],               // port out of range
        ["connect", "--name", "c.test", "s.test:7000"],                           // neither --bytes nor --duration
        ["connect", "--name", "c.test", "s.test:7000", "--bytes", "many"],
        ["connect", "--name", "c.test", "s.test", "--bytes", "1M"],               // no port
        ["connect", "--name", "c.test", "s.test:7000", "--bytes", "1M", "--view", "fancy"],
        ["cat", "--listen", "--name", "s.test"],                                  // --listen without --port
        ["cat", "--listen", "--name", "s.test", "--port", "7000", "s.test:7000"], // both
        ["cat", "--name", "c.test", "--port", "7000"],                            // --port without --listen
        ["cat", "--name", "c.test"],                                              // nothing to open
        ["serve", "--name", "s.test", "--port", "7000", "--sink", "--tcp-rto-min", "-5"],
        ["connect", "--name", "c.test", "s.test:7000", "--bytes", "1M", "--tcp-rto-min", "5000"],
    ])
    func invalidCommandLinesAreRejected(_ arguments: [String]) {
        #expect(throws: (any Error).self) { try NBSMobility.parseAsRoot(arguments) }
    }

    @Test func viewModeFollowsTheTerminal() {
        #expect(ViewMode.auto.resolved(isTerminal: true) == .live)
        #expect(ViewMode.auto.resolved(isTerminal: false) == .lines)
        #expect(ViewMode.off.resolved(isTerminal: true) == .off)
        #expect(ViewMode.lines.resolved(isTerminal: true) == .lines)
    }
}
