import Testing
@testable import nbs_mobility

@Suite struct ParsingTests {
    @Test func peer() throws {
        #expect(try parsePeer("server.example:7000") == ("server.example", 7000))
    }
}
