// See json.h.
#include "json.h"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <set>

#include "memmamba/memmamba.h"

namespace memmamba::json
{

namespace
{
constexpr int kMaxDepth = 64;
}

class Parser
{
public:
    explicit Parser(std::string const& text)
        : s_(text)
    {
    }

    Value document()
    {
        skipSpace();
        Value v = value(0);
        skipSpace();
        if (pos_ != s_.size())
        {
            fail("unexpected text after the JSON value");
        }
        return v;
    }

private:
    std::string const& s_;
    size_t pos_{0};

    [[noreturn]] void fail(std::string const& what) const
    {
        size_t line = 1, col = 1;
        for (size_t i = 0; i < pos_ && i < s_.size(); ++i)
        {
            if (s_[i] == '\n')
            {
                ++line;
                col = 1;
            }
            else
            {
                ++col;
            }
        }
        throw Error("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(col) + ": " + what);
    }

    bool atEnd() const { return pos_ >= s_.size(); }
    char peek() const { return atEnd() ? '\0' : s_[pos_]; }

    void skipSpace()
    {
        while (!atEnd() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
        {
            ++pos_;
        }
    }

    void expectWord(char const* word)
    {
        for (char const* p = word; *p; ++p, ++pos_)
        {
            if (peek() != *p)
            {
                fail(std::string("expected '") + word + "'");
            }
        }
    }

    Value value(int depth)
    {
        if (depth > kMaxDepth)
        {
            fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
        }
        Value v;
        char c = peek();
        if (c == '{')
        {
            v.kind_ = Value::Kind::kObject;
            ++pos_;
            skipSpace();
            std::set<std::string> seen;
            if (peek() == '}')
            {
                ++pos_;
                return v;
            }
            while (true)
            {
                skipSpace();
                if (peek() != '"')
                {
                    fail("expected a string key");
                }
                size_t keyAt = pos_;
                std::string key = string();
                if (!seen.insert(key).second)
                {
                    pos_ = keyAt;
                    fail("duplicate key \"" + key + "\"");
                }
                skipSpace();
                if (peek() != ':')
                {
                    fail("expected ':' after a key");
                }
                ++pos_;
                skipSpace();
                v.object_.emplace_back(std::move(key), value(depth + 1));
                skipSpace();
                if (peek() == ',')
                {
                    ++pos_;
                    continue;
                }
                if (peek() == '}')
                {
                    ++pos_;
                    return v;
                }
                fail("expected ',' or '}' in an object");
            }
        }
        if (c == '[')
        {
            v.kind_ = Value::Kind::kArray;
            ++pos_;
            skipSpace();
            if (peek() == ']')
            {
                ++pos_;
                return v;
            }
            while (true)
            {
                skipSpace();
                v.array_.push_back(value(depth + 1));
                skipSpace();
                if (peek() == ',')
                {
                    ++pos_;
                    continue;
                }
                if (peek() == ']')
                {
                    ++pos_;
                    return v;
                }
                fail("expected ',' or ']' in an array");
            }
        }
        if (c == '"')
        {
            v.kind_ = Value::Kind::kString;
            v.string_ = string();
            return v;
        }
        if (c == 't' || c == 'f')
        {
            v.kind_ = Value::Kind::kBool;
            v.bool_ = c == 't';
            expectWord(c == 't' ? "true" : "false");
            return v;
        }
        if (c == 'n')
        {
            expectWord("null");
            return v;
        }
        if (c == '-' || (c >= '0' && c <= '9'))
        {
            return number();
        }
        if (atEnd())
        {
            fail("unexpected end of text");
        }
        fail(std::string("unexpected character '") + c + "'");
    }

    Value number()
    {
        size_t start = pos_;
        bool integer = true;
        if (peek() == '-')
        {
            ++pos_;
        }
        if (peek() == '0')
        {
            ++pos_;
        }
        else if (peek() >= '1' && peek() <= '9')
        {
            while (peek() >= '0' && peek() <= '9')
                ++pos_;
        }
        else
        {
            fail("expected a digit");
        }
        if (peek() == '.')
        {
            integer = false;
            ++pos_;
            if (!(peek() >= '0' && peek() <= '9'))
                fail("expected a digit after '.'");
            while (peek() >= '0' && peek() <= '9')
                ++pos_;
        }
        if (peek() == 'e' || peek() == 'E')
        {
            integer = false;
            ++pos_;
            if (peek() == '+' || peek() == '-')
                ++pos_;
            if (!(peek() >= '0' && peek() <= '9'))
                fail("expected a digit in the exponent");
            while (peek() >= '0' && peek() <= '9')
                ++pos_;
        }
        std::string literal = s_.substr(start, pos_ - start);
        Value v;
        v.kind_ = Value::Kind::kNumber;
        // std::from_chars, not strtod: the same number whatever the host's locale (strtod reads LC_NUMERIC's decimal
        // point, so "0.5" read 0 in a comma-decimal locale an embedding application had set)
        auto parsed = std::from_chars(literal.data(), literal.data() + literal.size(), v.number_);
        if (parsed.ec == std::errc::result_out_of_range)
            v.number_ = literal[0] == '-' ? -HUGE_VAL : HUGE_VAL;   // as strtod gave: validation names it
        if (integer)
        {
            errno = 0;
            long long i = std::strtoll(literal.c_str(), nullptr, 10);
            v.integer_ = errno != ERANGE;
            v.int_ = i;
        }
        return v;
    }

    static void appendUtf8(std::string& out, uint32_t cp)
    {
        if (cp < 0x80)
        {
            out += static_cast<char>(cp);
        }
        else if (cp < 0x800)
        {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else if (cp < 0x10000)
        {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else
        {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4()
    {
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i, ++pos_)
        {
            char c = peek();
            v <<= 4;
            if (c >= '0' && c <= '9')
                v |= c - '0';
            else if (c >= 'a' && c <= 'f')
                v |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                v |= c - 'A' + 10;
            else
                fail("expected 4 hex digits after \\u");
        }
        return v;
    }

    std::string string()
    {
        ++pos_; // opening quote
        std::string out;
        while (true)
        {
            if (atEnd())
            {
                fail("unterminated string");
            }
            char c = s_[pos_];
            if (c == '"')
            {
                ++pos_;
                return out;
            }
            if (static_cast<unsigned char>(c) < 0x20)
            {
                fail("control character in a string");
            }
            if (c != '\\')
            {
                out += c;
                ++pos_;
                continue;
            }
            ++pos_;
            char e = peek();
            ++pos_;
            switch (e)
            {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u':
            {
                uint32_t cp = hex4();
                if (cp >= 0xD800 && cp <= 0xDBFF)
                {
                    if (peek() != '\\' || pos_ + 1 >= s_.size() || s_[pos_ + 1] != 'u')
                        fail("unpaired UTF-16 surrogate");
                    pos_ += 2;
                    uint32_t lo = hex4();
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        fail("unpaired UTF-16 surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                else if (cp >= 0xDC00 && cp <= 0xDFFF)
                {
                    fail("unpaired UTF-16 surrogate");
                }
                appendUtf8(out, cp);
                break;
            }
            default: --pos_; fail("unknown escape in a string");
            }
        }
    }
};

Value Value::parse(std::string const& text)
{
    return Parser(text).document();
}

char const* Value::kindName(Kind k)
{
    switch (k)
    {
    case Kind::kNull: return "null";
    case Kind::kBool: return "a boolean";
    case Kind::kNumber: return "a number";
    case Kind::kString: return "a string";
    case Kind::kArray: return "an array";
    case Kind::kObject: return "an object";
    }
    return "?";
}

namespace
{
[[noreturn]] void wrongKind(std::string const& what, char const* want, Value::Kind got)
{
    throw Error(what + " must be " + want + ", got " + Value::kindName(got));
}
} // namespace

bool Value::asBool(std::string const& what) const
{
    if (kind_ != Kind::kBool)
        wrongKind(what, "true or false", kind_);
    return bool_;
}

double Value::asNumber(std::string const& what) const
{
    if (kind_ != Kind::kNumber)
        wrongKind(what, "a number", kind_);
    return number_;
}

int64_t Value::asInt(std::string const& what) const
{
    if (kind_ != Kind::kNumber)
        wrongKind(what, "an integer", kind_);
    if (!integer_)
        throw Error(what + " must be an integer, got a non-integer number");
    return int_;
}

std::string const& Value::asString(std::string const& what) const
{
    if (kind_ != Kind::kString)
        wrongKind(what, "a string", kind_);
    return string_;
}

std::vector<Value> const& Value::asArray(std::string const& what) const
{
    if (kind_ != Kind::kArray)
        wrongKind(what, "an array", kind_);
    return array_;
}

std::vector<std::pair<std::string, Value>> const& Value::asObject(std::string const& what) const
{
    if (kind_ != Kind::kObject)
        wrongKind(what, "an object", kind_);
    return object_;
}

Value const* Value::find(std::string const& key) const
{
    for (auto const& kv : object_)
    {
        if (kv.first == key)
            return &kv.second;
    }
    return nullptr;
}

} // namespace memmamba::json
